"""The simulator runs the real scheduler and policies on a roofline: conservation, capacity,
determinism, and the CLI."""

import dataclasses
import json

import pytest

from orbitflow_ray.cli import main
from orbitflow_ray.sim.simulator import SimConfig, Simulator, simulate
from orbitflow_ray.sim.workload import TraceRequest, WorkloadConfig, generate

POLICIES = ["orbitflow", "no-offload", "all-offload", "static-uniform", "flexgen-plus", "select-n",
            "orbitflow-uniform", "orbitflow-no-deposit", "orbitflow-no-pause"]


@pytest.fixture(scope="module")
def trace():
    return generate(WorkloadConfig(length="longbench", rate_per_s=2.0, num_requests=16, max_input_tokens=16_000,
                                   seed=3))


def config(policy, **kw):
    # 2 GiB of KV: about 16K tokens of Llama-3.1-8B, far below the trace's demand.
    return SimConfig.build(model="llama-3.1-8b", gpu="a100-80gb", kv_policy=policy, device_kv_bytes=2 << 30, **kw)


@pytest.mark.parametrize("policy", POLICIES)
def test_conservation_and_capacity(policy, trace):
    r = simulate(config(policy), trace)
    m = r.metrics
    by_id = {t.request_id: t for t in trace}
    assert m["num_requests"] == len(trace) == len(r.records)
    assert m["num_finished"] + m["num_failed"] == len(trace)
    for rec in r.records:
        if rec.finished:  # every token counted once, in time order
            assert len(rec.release_times) == by_id[rec.request_id].output_tokens
            assert list(rec.release_times) == sorted(rec.release_times)
            assert rec.release_times[0] >= rec.arrival_s
    assert 0 <= m["peak_device_kv_bytes"] <= m["device_kv_capacity_bytes"]
    assert m["num_finished"] == len(trace)  # nothing here is infeasible on arrival


def test_offloading_policies_move_bytes(trace):
    assert simulate(config("all-offload"), trace).metrics["link_bytes_per_output_token"] > 0


def test_deterministic_under_a_seed(trace):
    a, b = (simulate(config("orbitflow", pause_strategy="random", seed=7), trace) for _ in range(2))
    assert [r.release_times for r in a.records] == [r.release_times for r in b.records]
    assert a.metrics == b.metrics


def test_infeasible_requests_are_reported_failed():
    huge = [TraceRequest("big", 0.0, 120_000, 10), TraceRequest("ok", 0.0, 100, 5)]
    r = simulate(config("no-offload"), huge)
    assert r.metrics["num_failed"] == 1 and r.metrics["num_finished"] == 1
    assert [rec.finished for rec in r.records if rec.request_id == "big"] == [False]


def test_slo_is_a_scale_of_the_full_capacity_step():
    one, two = (simulate(config("no-offload", slo_scale=s), []).tpot_slo_s for s in (1.0, 2.0))
    assert two == pytest.approx(2 * one) and 1e-3 < one < 1.0


def test_default_ttft_slo_idle_request_meets_it_queued_one_misses():
    # Two 6000-token prompts at once: one prefill fills the 8192-token step, the other waits a step.
    trace = [TraceRequest("first", 0.0, 6000, 1), TraceRequest("second", 0.0, 6000, 1)]
    sim = Simulator(config("no-offload", slo_scale=1.5))
    rl, step = sim.roofline, sim.base_step_s
    prefill = rl.step_compute_s(0, 6000, 1, 1)
    assert sim.idle_prefill(6000) == (pytest.approx(prefill), 1)
    expected = 1.5 * (prefill + 2 * step)  # scale x (idle prefill + one step per chunk + one)
    r = sim.run(trace)
    first, second = sorted(r.records, key=lambda x: x.request_id)
    assert first.ttft_slo_s == second.ttft_slo_s == pytest.approx(expected)
    assert first.ttft_s == pytest.approx(prefill)  # alone on the device: its idle prefill, on time
    assert first.slo_met()["ttft"] and first.meets_all()
    assert second.ttft_s > 2 * prefill > second.ttft_slo_s and not second.slo_met()["ttft"]
    assert r.metrics["ttft_attainment"] == 0.5
    assert r.metrics["goodput_req_s"] == pytest.approx(1 / r.metrics["makespan_s"])


def test_default_ttft_slo_follows_chunks_and_scale():
    sim = Simulator(config("no-offload", slo_scale=1.0))
    rl = sim.roofline
    chunks = [(0, 8192, 0), (8192, 8192, 0), (16384, 3616, 1)]  # 20000 tokens in 8192-token chunks
    prefill = sum(rl.step_compute_s(c, n, 1, s) for c, n, s in chunks)
    assert sim.idle_prefill(20_000) == (pytest.approx(prefill), 3)
    assert sim.ttft_slo_s(20_000) == pytest.approx(prefill + 4 * sim.base_step_s)
    assert Simulator(config("no-offload", slo_scale=2.5)).ttft_slo_s(20_000) == pytest.approx(
        2.5 * sim.ttft_slo_s(20_000))


def test_ttft_slo_overrides_per_run_and_per_request():
    trace = [TraceRequest("own", 0.0, 500, 2, ttft_slo_s=7.0), TraceRequest("run", 0.0, 500, 2)]
    r = simulate(config("no-offload", ttft_slo_s=0.001), trace)
    assert {x.request_id: x.ttft_slo_s for x in r.records} == {"own": 7.0, "run": 0.001}
    assert r.metrics["ttft_attainment"] == 0.5  # no prefill takes 1 ms
    unjudged = simulate(config("no-offload", ttft_slo_s=float("inf")), trace[1:])
    assert unjudged.metrics["ttft_attainment"] == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="ttft_slo_s"):
            config("no-offload", ttft_slo_s=bad)


def test_cli_slo_flags(capsys):
    args = ["simulate", "--policy", "no-offload", "--workload", "fixed", "--input-tokens", "200",
            "--output-tokens", "4", "--num-requests", "3", "--device-kv-bytes", "1GiB", "--json"]
    assert main(args + ["--ttft-slo", "0.001", "--tpot-slo", "5"]) == 0
    m = json.loads(capsys.readouterr().out)["runs"][0]["metrics"]
    assert (m["ttft_attainment"], m["tpot_attainment"], m["goodput_req_s"]) == (0.0, 1.0, 0.0)
    assert m["tpot_slo_s"] == 5.0 and m["p50_ttft_slo_s"] == 0.001
    assert main(args) == 0  # the default rule: 3 short prompts on an idle A100 meet it
    m = json.loads(capsys.readouterr().out)["runs"][0]["metrics"]
    assert m["ttft_attainment"] == 1.0 and 0 < m["p50_ttft_slo_s"] < 1.0
    with pytest.raises(SystemExit):
        main(args + ["--ttft-slo", "0"])
    assert "--ttft-slo: expected positive seconds" in capsys.readouterr().err


def test_cli_simulate_and_compare(tmp_path, capsys):
    assert main(["simulate", "--policy", "orbitflow", "--admission", "fcfs", "--workload", "sharegpt",
                 "--num-requests", "8", "--rate", "4", "--device-kv-bytes", "1GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"][0]["policy"] == "orbitflow+fcfs" and out["runs"][0]["metrics"]["num_requests"] == 8
    # a policy+admission name runs that policy with that admission
    assert main(["compare", "--policies", "orbitflow,all-offload+slo", "--rates", "1,4", "--num-requests", "6",
                 "--device-kv-bytes", "1GiB", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {(r["policy"], r["rate"]) for r in report["runs"]} == {
        (p, r) for p in ("orbitflow", "all-offload+slo") for r in (1.0, 4.0)}
    md = (tmp_path / "report.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| policy"))
    assert head.startswith("| policy | goodput req/s @1/s | TTFT att. @1/s | P95 TTFT @1/s | TPOT att. @1/s | "
                           "TBT att. @1/s |")
    assert all(r["metrics"]["ttft_attainment"] is not None and r["metrics"]["p50_ttft_slo_s"] > 0
               for r in report["runs"])
    assert (tmp_path / "attainment_vs_rate.png").exists()
    assert main(["simulate", "--list"]) == 0
    assert "llama-3.1-8b" in capsys.readouterr().out


def test_pressure_family_makes_orbitflow_pause_and_every_request_finishes():
    # The results grid's Pause-Resume family: 2K-4K-token outputs from short prompts, bursty
    # arrivals, 512 MiB of device KV (4K tokens of Llama-3.1-8B): batches admitted when they fit
    # outgrow the device within a few plan windows. Window-horizon admission: default orbitflow
    # (lifetime judgement, its tie broken on everyone's late steps) runs this trace without a pause.
    trace = generate(WorkloadConfig(length="pressure", arrival="gamma", cv=3.0, rate_per_s=1.0,
                                    num_requests=8, seed=0))
    assert all(t.output_tokens > 128 for t in trace)  # longer than the longest plan window
    r = simulate(SimConfig.build(model="llama-3.1-8b", gpu="a100-80gb", kv_policy="orbitflow-window-admit",
                                 device_kv_bytes=512 << 20), trace)
    assert r.metrics["num_finished"] == len(trace)
    assert r.metrics["total_pauses"] > 0
    assert r.policy_metrics["pauses"] == r.metrics["total_pauses"]
    outputs = {t.request_id: t.output_tokens for t in trace}
    assert {rec.request_id: len(rec.release_times) for rec in r.records} == outputs


def test_config_holds_an_engine_config_and_names_a_bad_field():
    cfg = SimConfig.build(model="llama-3-70b", gpu="h100-80gb-sxm", tensor_parallel_size=4, kv_policy="select-n",
                          device_kv_bytes=1 << 30, slo_scale=2.5, tpot_slo_s=0.05)
    e = cfg.engine
    assert (e.model, e.tensor_parallel_size, e.kv_policy, e.device_kv_bytes) == ("llama-3-70b", 4, "select-n", 1 << 30)
    assert (cfg.gpu, cfg.slo_scale, cfg.tpot_slo_s, cfg.dtype_bytes) == ("h100-80gb-sxm", 2.5, 0.05, 2)
    assert (e.max_num_seqs, e.host_kv_bytes, e.solve_ahead) == (16, 512 << 30, False)  # the simulator's defaults
    moved = cfg.replace(kv_policy="orbitflow", slo_scale=1.0)
    assert (moved.engine.kv_policy, moved.slo_scale, moved.engine.model) == ("orbitflow", 1.0, "llama-3-70b")
    assert cfg.engine.kv_policy == "select-n"  # replace copies
    flat = cfg.to_dict()  # what reports show: engine fields the simulator reads, then its own
    assert flat["tensor_parallel_size"] == 4 and flat["tpot_slo_s"] == 0.05 and "backend" not in flat
    with pytest.raises(TypeError, match="'tp'"):
        SimConfig.build(tp=2)
    with pytest.raises(ValueError, match="block_size"):
        SimConfig.build(block_size=0)
    with pytest.raises(ValueError, match="kv_capacity_fraction"):
        SimConfig(kv_capacity_fraction=1.5)
    with pytest.raises(ValueError, match="ttft_slo_s"):
        SimConfig(ttft_slo_s=0.0)
    with pytest.raises(TypeError, match="engine"):
        SimConfig(engine={"model": "llama-3.1-8b"})


def test_engine_link_bandwidth_replaces_the_gpu_link():
    """A CPU engine's emulated link (engine.link_bandwidth_bytes_per_s) is the simulated host link."""
    fast, slow = (Simulator(config("static-uniform", link_bandwidth_bytes_per_s=bw)) for bw in (None, 1e9))
    assert slow.roofline.gpu.host_link_bytes_per_s == 1e9 and slow.roofline.gpu.host_link_efficiency == 1.0
    assert fast.roofline.gpu.host_link_bytes_per_s != 1e9


def test_an_empty_plan_is_skipped_by_the_simulator_and_run_by_the_engine():
    """One StepLoop for both: the simulator neither executes nor counts a plan with nothing in it
    (it waits for the next arrival); the engine executes every plan (finished ids reach the runner)."""
    from orbitflow_ray.engine import LLMEngine
    from orbitflow_ray.config import EngineConfig

    sim = Simulator(SimConfig.build(model="llama-3.1-8b", gpu="a100-80gb", device_kv_bytes=1 << 30))
    assert sim.loop.executor is sim.executor and sim.loop.step() is None and sim.num_steps == 0
    eng = LLMEngine(EngineConfig(model="tiny-llama", kv_policy="no-offload"))
    calls, execute = [], eng.runner.execute
    eng.runner.execute = lambda out: calls.append(out) or execute(out)
    step = eng.loop.step()
    assert calls == [step.out] and step.out.is_empty and step.result.sampled == {} and step.updated == []
    eng.close()


def test_grid_runs_the_same_in_worker_processes_and_from_the_cache(tmp_path, trace, monkeypatch):
    from orbitflow_ray.sim import compare

    def strip(runs):  # wall-clock keys differ run to run; everything else is the simulation's
        return [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k not in ("sim_wall_s", "solve_s_sync")}}
                for r in runs]

    args = (config("orbitflow"), trace[:8], 2.0, ["orbitflow", "no-offload+slo"], [2.0, 8.0], [1.5])
    serial = compare.run_grid(*args, progress=False)
    assert [(r["policy"], r["rate"]) for r in serial] == [
        ("orbitflow", 2.0), ("orbitflow", 8.0), ("no-offload+slo", 2.0), ("no-offload+slo", 8.0)]
    cache = compare.RunCache(tmp_path)
    parallel = compare.run_grid(*args, progress=False, jobs=2, cache=cache)
    assert strip(parallel) == strip(serial) and cache.hits == 0
    assert len(list(tmp_path.rglob("*.json"))) == 4
    again = compare.RunCache(tmp_path)
    assert json.loads(json.dumps(compare.run_grid(*args, progress=False, cache=again))) == json.loads(json.dumps(parallel))
    assert again.hits == 4
    # another version of the code never reads these runs
    monkeypatch.setattr(compare, "code_version", lambda: "another")
    other = compare.RunCache(tmp_path)
    assert other.get(*args[:3], "orbitflow", 2.0, 1.5) is None
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        compare.run_grid(*args, jobs=0)


def test_planning_searches_are_charged_to_the_virtual_clock(trace):
    """A solve that runs the solver's search costs `solve_cost_s` of virtual time; one settled with
    no search (the batch fits on device whole, `problem.fit_whole_plan`) costs none."""
    # 512 MiB of device KV (about 4K tokens): no request of the trace fits whole, so solves search
    runs = {cost: simulate(SimConfig.build(model="llama-3.1-8b", gpu="a100-80gb", kv_policy="orbitflow",
                                           device_kv_bytes=512 << 20, solve_cost_s=cost), trace[:6])
            for cost in (0.0, 0.5)}
    m = runs[0.0].policy_metrics
    assert m["solves_searched"] > 0 and m["solves_sync"] + m["solves_ahead"] >= m["solves_searched"]
    # every search costs half a second of virtual time: the run ends later, TTFTs are later
    assert runs[0.5].metrics["makespan_s"] > runs[0.0].metrics["makespan_s"] + 0.5
    assert runs[0.5].metrics["p50_ttft_s"] > runs[0.0].metrics["p50_ttft_s"]
    # two short requests fit on device whole: every plan is settled with no search, and charged nothing
    short = [dataclasses.replace(t, input_tokens=512, output_tokens=64) for t in trace[:2]]
    fit = {cost: simulate(config("orbitflow", solve_cost_s=cost), short) for cost in (0.0, 0.5)}
    m = fit[0.5].policy_metrics
    assert m["solves_searched"] == 0 and m["plans_fit_whole"] > 0 and m["plans"] > 0
    assert fit[0.5].metrics["makespan_s"] == fit[0.0].metrics["makespan_s"]
