"""The load-test harness: report math by hand, failures recorded, the CLI, and (slow) the client
against a live Ray-free app under uvicorn."""

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
from aiohttp import web

from load_tests.app import free_port, load_serve_config, with_policy
from load_tests.client import ClientConfig, RequestResult, run_trace
from load_tests.report import write_load_report
from orbitflow_ray.metrics import summarize
from orbitflow_ray.sim.workload import TraceRequest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(rid, arrival, sent, times, error=None, prompt=10):
    req = TraceRequest(rid, arrival, prompt, max(1, len(times)), tpot_slo_s=0.25, ttft_slo_s=2.0)
    return RequestResult(req, prompt, sent_s=sent, token_times=list(times),
                         usage_completion_tokens=len(times) if error is None else None, error=error)


def test_report_math_by_hand(tmp_path):
    # r2 waited 0.5 s client-side (arrival 0.5, sent 1.0): its latencies run from 1.0.
    results = [_result("r1", 0.0, 0.0, (1.0, 1.2, 1.4, 1.6)),          # TTFT 1.0, TBTs .2 .2 .2
               _result("r2", 0.5, 1.0, (2.5, 2.6, 3.1), prompt=20),     # TTFT 1.5, TBTs .1 .5, TPOT .3
               _result("r3", 2.0, 2.0, (5.0, 5.2), prompt=30),          # TTFT 3.0 (> 2.0), TBT .2
               _result("r4", 3.0, 3.0, (), error="HTTP 400: bad")]      # failed
    records = [r.record(default_tpot_slo_s=9.0) for r in results]
    m = summarize(records)
    assert (m["num_requests"], m["num_finished"], m["num_failed"], m["output_tokens"]) == (4, 3, 1, 9)
    assert m["makespan_s"] == pytest.approx(5.2)                 # first send 0 -> last token 5.2
    assert m["tbt_attainment"] == pytest.approx(5 / 6)           # only r2's 0.5 s gap misses 0.25
    assert m["tpot_attainment"] == pytest.approx(2 / 3)          # r2's TPOT 0.3 misses
    assert m["ttft_attainment"] == pytest.approx(2 / 3)          # r3's 3.0 s misses 2.0
    assert m["p50_ttft_s"] == pytest.approx(1.5)
    assert m["p95_ttft_s"] == pytest.approx(2.85)                # 1.5 + 0.9 * (3.0 - 1.5)
    assert m["p50_tbt_s"] == pytest.approx(0.2)                  # [.1 .2 .2 .2 .2 .5]
    assert m["p95_tbt_s"] == pytest.approx(0.425)                # 0.2 + 0.75 * 0.3
    assert m["p95_tpot_s"] == pytest.approx(0.29)                # [.2 .2 .3]: 0.2 + 0.9 * 0.1
    assert m["throughput_tok_s"] == pytest.approx(69 / 5.2)      # (10+20+30 in + 9 out) / 5.2
    assert m["goodput_req_s"] == pytest.approx(1 / 5.2)          # r1 alone meets every SLO
    assert m["all_slo_attainment"] == pytest.approx(1 / 4)       # of all four, the failed one included
    assert m["tbt_request_attainment"] == pytest.approx(2 / 3)   # r2 has a late gap (of 2: none allowed)
    assert [r.client_wait_s for r in results] == [0.0, 0.5, 0.0, 0.0]

    m["p95_client_wait_s"] = 0.425
    runs = [{"policy": "orbitflow", "rate": 1.0, "slo_scale": None, "metrics": m, "errors": {"HTTP 400: bad": 1},
             "_results": results, "_records": records}]
    paths = write_load_report(runs, tmp_path, context={"model": "m"})
    doc = json.loads(paths["report.json"].read_text())
    assert set(doc) == {"runs", "context"} and doc["context"] == {"model": "m"}
    assert doc["runs"][0]["metrics"]["tbt_attainment"] == pytest.approx(5 / 6)
    assert "_results" not in doc["runs"][0]
    md = paths["report.md"].read_text()
    for text in ("| TBT attainment (tokens) | 83.3% |", "| TPOT attainment | 66.7% |", "| P95 TTFT | 2.85 s |",
                 "| P95 TBT | 425 ms |", "| requests failed | 1 |", "HTTP 400: bad",
                 "| goodput (req/s meeting TTFT, TPOT and TBT SLOs) | 0.192 |",
                 "| requests meeting all SLOs (of all) | 25.0% |", "| TBT attainment (requests, P99 gap) | 66.7% |"):
        assert text in md, text
    lines = [json.loads(x) for x in paths["requests.jsonl"].read_text().splitlines()]
    assert [x["client_wait_s"] for x in lines] == [0.0, 0.5, 0.0, 0.0] and lines[3]["error"] == "HTTP 400: bad"
    for name in ("ttft_cdf.png", "tpot_cdf.png", "tbt_cdf.png", "slo_attainment.png", "latency_over_time.png",
                 "throughput_over_time.png"):
        assert paths[name].read_bytes()[:8] == PNG_MAGIC, name


async def _failing_server():
    async def bad(request):
        return web.json_response({"error": {"message": "max_tokens: too large", "type": "invalid_request_error"}},
                                 status=400)

    async def slow(request):
        await asyncio.sleep(2)  # well past the client's 0.3 s timeout
        return web.Response(text="late")

    async def broken(request):  # a stream that stops without finishing
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": "hi", "finish_reason": null}]}\n\n')
        return resp

    app = web.Application()
    for path, handler in (("/bad/v1/completions", bad), ("/slow/v1/completions", slow),
                          ("/broken/v1/completions", broken)):
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def test_failures_are_recorded_not_dropped():
    trace = [TraceRequest("a", 0.0, 5, 4), TraceRequest("b", 0.05, 5, 4)]

    async def main():
        runner, base = await _failing_server()
        try:
            out = {}
            for name, url, timeout in (("bad", base + "/bad", 30.0), ("slow", base + "/slow", 0.3),
                                       ("broken", base + "/broken", 30.0),
                                       ("refused", f"http://127.0.0.1:{free_port()}", 30.0)):
                cfg = ClientConfig(url, "m", timeout_s=timeout, max_concurrency=1)
                out[name] = await run_trace(trace, ["x", "y"], cfg, progress=False)
            return out
        finally:
            await runner.cleanup()

    out = asyncio.run(main())
    for name, results in out.items():
        assert len(results) == 2 and all(not r.ok for r in results), name
        assert all(not r.record(0.25).finished for r in results), name
    assert out["bad"][0].error == "HTTP 400: max_tokens: too large"
    assert "timed out after 0.3 s" in out["slow"][0].error
    # the cap of 1 held b back until a had timed out: its wait is recorded apart
    assert out["slow"][1].client_wait_s == pytest.approx(0.25, abs=0.15)
    assert "without [DONE]" in out["broken"][0].error and len(out["broken"][0].token_times) == 1
    assert "Connect" in out["refused"][0].error
    assert summarize([r.record(0.25) for r in out["refused"]])["num_failed"] == 2


def test_cli_help():
    p = subprocess.run([sys.executable, "-m", "load_tests", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for flag in ("--config", "--url", "--policies", "--compare-sim", "--max-concurrency", "--warmup", "--trace"):
        assert flag in p.stdout
    assert "default:" in p.stdout and "Examples:" in p.stdout


def test_policies_name_an_admission_as_the_simulator_does():
    """`--policies no-offload+slo`: the app is redeployed with that KV policy under the `slo`
    admission; a bare name keeps the config's admission; a bad admission is refused before
    anything is deployed, naming the known ones."""
    spec = load_serve_config("deployments/config.yaml")
    engine = spec.with_policy("no-offload+slo")["engine"]
    assert (engine["kv_policy"], engine["admission"]) == ("no-offload", "slo")
    assert "admission" not in spec.with_policy("flexgen-plus")["engine"]
    assert with_policy({"engine": {"admission": "fcfs"}}, "orbitflow")["engine"] == {"kv_policy": "orbitflow",
                                                                                     "admission": "fcfs"}
    assert spec.args["engine"]["kv_policy"] == "orbitflow"  # the spec itself is left as it was
    with pytest.raises(ValueError, match="fcfs"):
        spec.with_policy("no-offload+lifo")
    with pytest.raises(ValueError, match=r"name an admission after '\+'"):
        spec.with_policy("no-offload+")


# ---------------------------------------------------------------- live (slow)

ENGINE = {"kv_policy": "orbitflow", "plan_windows": [8], "tpot_slo_s": 0.1}


@pytest.fixture
def live_app():
    """The Ray-free app (API + worker + in-process planner) under uvicorn on a loopback port."""
    import uvicorn

    from orbitflow_ray.serving.api import build_api
    from orbitflow_ray.serving.app_config import AppArgs
    from orbitflow_ray.serving.central import InProcessPlanner
    from orbitflow_ray.serving.openai_service import OpenAIService
    from orbitflow_ray.serving.worker_core import WorkerCore

    port, box, ready = free_port(), {}, threading.Event()

    def serve():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        args = AppArgs(engine=ENGINE, telemetry_period_s=0.2)
        planner = InProcessPlanner()
        box["core"] = WorkerCore(args.engine_config(), "w0", planner, 0.2).start(loop)

        async def state():
            return planner.planner.state()

        app = build_api(OpenAIService(args, box["core"].core.stream), state)
        box["server"] = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        ready.set()
        loop.run_until_complete(box["server"].serve())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(60)
    deadline = time.time() + 30
    while not box["server"].started and time.time() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    box["server"].should_exit = True
    thread.join(15)
    box["core"].core.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_client_against_live_app(live_app, tmp_path):
    from load_tests.cli import main

    config = tmp_path / "app.yaml"
    config.write_text(json.dumps({"applications": [{"name": "orbitflow", "import_path": "deployments.orbitflow_app:build_app",
                                                    "args": {"engine": ENGINE}}]}))
    out = tmp_path / "report"
    assert main(["--url", live_app, "--config", str(config), "--workload", "uniform", "--min-input-tokens", "8",
                 "--max-input-tokens", "40", "--min-output-tokens", "8", "--max-output-tokens", "16",
                 "--num-requests", "5", "--rate", "4", "--compare-sim", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "report.json").read_text())
    (run,) = doc["runs"]
    m = run["metrics"]
    assert (m["num_requests"], m["num_finished"], m["num_failed"], m["token_count_mismatches"]) == (5, 5, 0, 0)
    assert m["p95_ttft_s"] > 0 and m["p95_tbt_s"] > 0 and m["tbt_attainment"] is not None
    assert run["predicted"]["num_finished"] == 5 and run["server_kv"]["num_steps"] > 0
    reqs = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(reqs) == 5
    for r in reqs:
        assert r["error"] is None and r["finish_reason"] == "length"
        assert r["tokens_received"] == r["usage_completion_tokens"] == r["output_tokens"]
        assert r["prompt_tokens"] == r["input_tokens"]  # exact prompts (the model's tokenizer)
        assert r["ttft_s"] > 0 and r["tpot_s"] > 0
        times = r["token_times_s"]  # every token's arrival after the send: its first is the TTFT
        assert len(times) == r["tokens_received"] and times == sorted(times)
        assert times[0] == pytest.approx(r["ttft_s"]) and times[-1] > times[0]
    md = (out / "report.md").read_text()
    assert "`orbitflow` measured" in md and "`orbitflow` simulated" in md and "![tbt_cdf](tbt_cdf.png)" in md
    assert all((out / n).read_bytes()[:8] == PNG_MAGIC for n in ("tbt_cdf.png", "latency_over_time.png"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_policies_redeploy_the_app_into_one_side_by_side_report(tmp_path):
    """`--policies`: the harness starts the app from its Serve config, redeploys it per KV policy
    (one of them under another admission), runs the same trace on each and writes one report with
    a run per policy."""
    out = tmp_path / "policies"
    cmd = [sys.executable, "-m", "load_tests", "--config", "deployments/config.yaml", "--port", "0",
           "--policies", "no-offload+slo,orbitflow", "--workload", "fixed", "--input-tokens", "200",
           "--output-tokens", "8", "--num-requests", "3", "--rate", "3", "--warmup", "0",
           "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    runs = {r["policy"]: r["metrics"] for r in report["runs"]}
    assert set(runs) == {"no-offload+slo", "orbitflow"}
    assert all(m["num_finished"] == 3 and m["output_tokens"] == 24 for m in runs.values())
    assert "no-offload+slo" in (out / "report.md").read_text()
