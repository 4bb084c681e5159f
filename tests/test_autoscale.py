"""Serve's autoscaler on the OrbitFlow app: a second worker replica is added under load and removed
when idle (min 1, max 2), and every request sent meanwhile is answered with the right tokens.

tiny-llama (random weights, no tokenizer): prompts go as token ids and the answer's tokens are read
from its logprobs ("token_id:N"), compared with the offline engine's greedy output.

Run: .venv/bin/python -m pytest -q -m slow tests/test_autoscale.py
"""

from __future__ import annotations

import asyncio
import time

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx2")

from ray import serve  # noqa: E402

from orbitflow_ray import LLM  # noqa: E402
from orbitflow_ray.sampling_params import SamplingParams  # noqa: E402
from serve_util import serve_app, wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODEL, MAX_TOKENS = "tiny-llama", 48
ENGINE = {"kv_policy": "orbitflow", "device_kv_bytes": 4 << 20, "host_kv_bytes": 4 << 20, "tpot_slo_s": 0.5}
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 2,
               "metrics_interval_s": 0.5, "look_back_period_s": 1.0, "upscale_delay_s": 1.0,
               "downscale_delay_s": 3.0}
PROMPTS = [[(7 * i + j) % 500 + 1 for j in range(8 + i)] for i in range(6)]


def _running_replicas() -> int:
    app = serve.status().applications["orbitflow"]  # serve_app deploys it under this name
    return app.deployments["OrbitFlowWorker"].replica_states.get("RUNNING", 0)


async def _complete(client: httpx.AsyncClient, i: int) -> tuple[int, list[int]]:
    body = {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "logprobs": 1}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    return i, [int(t.removeprefix("token_id:")) for t in tokens]


async def _load(base: str, concurrency: int, until) -> list[tuple[int, list[int]]]:
    """`concurrency` clients sending back to back until `until()` is true; every answer."""
    answers, sent = [], iter(range(10 ** 6))

    async def client_loop(client):
        while not until():
            answers.append(await _complete(client, next(sent)))

    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return answers


def test_autoscaler_adds_a_worker_under_load_and_removes_it_idle_losing_nothing():
    llm = LLM(MODEL, **{k: v for k, v in ENGINE.items() if k != "tpot_slo_s"})
    want = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))]
    llm.engine.close()
    args = {"model": MODEL, "engine": ENGINE, "torch_threads": 1, "telemetry_period_s": 0.3}
    with serve_app(args, {"autoscaling_config": AUTOSCALING}, num_cpus=2) as base:
        assert _running_replicas() == 1
        t0 = time.monotonic()
        seen = {"up": None}

        def scaled_up_a_while_ago() -> bool:  # keep loading 3 s past the second replica's start
            if seen["up"] is None and _running_replicas() == 2:
                seen["up"] = time.monotonic()
            return (seen["up"] is not None and time.monotonic() - seen["up"] > 3.0) or time.monotonic() - t0 > 90
        busy = asyncio.run(_load(base, 8, scaled_up_a_while_ago))
        assert seen["up"] is not None, "the autoscaler never added a replica under load"

        # One client at a time while the autoscaler removes the idle replica: nothing may be lost.
        t1 = time.monotonic()
        quiet = asyncio.run(_load(base, 1, lambda: _running_replicas() == 1 or time.monotonic() - t1 > 60))
        wait_for(lambda: _running_replicas() == 1, 30, "the second replica to be removed when idle")
        print(f"scaled up after {seen['up'] - t0:.1f} s of load ({len(busy)} requests), down after "
              f"{time.monotonic() - t1:.1f} s of one client ({len(quiet)} requests)")
        for i, got in busy + quiet:
            assert got == want[i % len(PROMPTS)], f"request {i}: wrong tokens"
        assert len(busy) >= 8 and len(quiet) >= 1
