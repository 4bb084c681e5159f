"""Clients that leave, through real HTTP (uvicorn on a port, the Ray-free app over a real engine):
a non-streaming client and one that leaves during a long prefill must have their request aborted
and its KV freed within a step. And the default max_tokens: a request without one runs on
small-KV configs instead of being sized as the whole context and refused.

Run: .venv/bin/python -m pytest -q tests/test_serving_disconnect.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import httpx2 as httpx
import pytest
import uvicorn

from orbitflow_ray.config import EngineConfig
from orbitflow_ray.engine import LLMEngine
from orbitflow_ray.sampling_params import SamplingParams
from orbitflow_ray.serving.api import build_api
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.serving.engine_loop import AsyncEngine, fitting_max_tokens
from orbitflow_ray.serving.messages import GenerateRequest
from orbitflow_ray.serving.openai_service import OpenAIService

TINY = "tiny-llama"  # 4 layers, 2048 positions, no tokenizer: token-id prompts
CHUNK = 32  # prompt tokens per prefill step: a 1,600-token prompt takes 50 steps
STEP_S = 0.03  # every step is slowed to this, so "within a step" is not a race against fast steps
ENGINE = dict(kv_policy="no-offload", device_kv_bytes=4 << 20, host_kv_bytes=4 << 20,
              prefill_chunk_size=CHUNK, max_num_batched_tokens=CHUNK)


@contextlib.contextmanager
def _server(args: AppArgs, step_s: float = STEP_S):
    """uvicorn serving the app over one AsyncEngine on a free port; yields (port, engine core)."""
    ae = AsyncEngine(LLMEngine(args.engine_config()))
    step = ae.engine.step

    def slow_step():
        time.sleep(step_s)
        return step()
    ae.engine.step = slow_step
    ae.start()
    app = build_api(OpenAIService(args, ae.stream))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert server.started, "uvicorn did not start"
        yield port, ae
    finally:
        server.should_exit = True
        thread.join(10)
        ae.shutdown(timeout_s=5.0)


def _engine_state(ae: AsyncEngine) -> SimpleNamespace:
    def read(e: LLMEngine):
        s = e.scheduler
        reqs = list(s.requests.values())
        kv = e.kv_stats()
        return SimpleNamespace(steps=e.num_steps, unfinished=e.has_unfinished_requests(),
                               device=kv["device_kv_bytes_used"], host=kv["host_kv_bytes_used"],
                               computed=[r.num_computed_tokens for r in reqs],
                               outputs=[len(r.output_token_ids) for r in reqs])
    return ae.call(read).result(timeout=10)


def _wait(ae: AsyncEngine, until, timeout_s: float = 20.0) -> SimpleNamespace:
    deadline = time.monotonic() + timeout_s
    state = _engine_state(ae)
    while not until(state) and time.monotonic() < deadline:
        time.sleep(0.005)
        state = _engine_state(ae)
    return state


def _send(port: int, route: str, body: dict) -> socket.socket:
    """Open a connection and send one POST; the caller reads or closes it."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {route} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_during_a_long_prefill_frees_kv_within_a_step(stream):
    prompt = [7] * 1600
    prefill_steps = len(prompt) // CHUNK
    body = {"model": TINY, "prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": stream}
    with _server(AppArgs(model=TINY, engine=ENGINE)) as (port, ae):
        sock = _send(port, "/v1/completions", body)
        mid = _wait(ae, lambda s: s.computed and s.computed[0] >= 10 * CHUNK)
        assert mid.unfinished and mid.device > 0 and mid.computed[0] < len(prompt) and mid.outputs == [0]
        sock.close()
        left = _engine_state(ae)
        freed = _wait(ae, lambda s: not s.unfinished)
    assert (freed.unfinished, freed.device, freed.host) == (False, 0, 0)
    # The step running when the client left may finish; the abort lands at the boundary after it.
    assert freed.steps - left.steps <= 2, (left.steps, freed.steps)
    assert freed.steps < prefill_steps  # the prefill was cut short: it never reached a token


def test_non_streaming_client_leaving_mid_generation_frees_kv_within_a_step():
    body = {"model": TINY, "prompt": [5] * 40, "max_tokens": 1000, "ignore_eos": True}
    with _server(AppArgs(model=TINY, engine=ENGINE)) as (port, ae):
        sock = _send(port, "/v1/completions", body)
        mid = _wait(ae, lambda s: s.outputs and s.outputs[0] >= 5)
        assert mid.unfinished and mid.device > 0
        sock.close()
        left = _engine_state(ae)
        freed = _wait(ae, lambda s: not s.unfinished)
        assert (freed.unfinished, freed.device, freed.host) == (False, 0, 0)
        assert freed.steps - left.steps <= 2, (left.steps, freed.steps)
        # The server goes on serving: the same request, read to the end, completes in full.
        sock = _send(port, "/v1/completions", {**body, "max_tokens": 3})
        reply = b""
        while b"}}" not in reply[-200:]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        sock.close()
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(payload)["usage"]["completion_tokens"] == 3


# ---- the default max_tokens -----------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["no-offload", "all-offload", "orbitflow", "static-uniform"])
def test_fitting_max_tokens_is_the_largest_the_engine_admits(policy):
    engine = LLMEngine(EngineConfig(model=TINY, kv_policy=policy, device_kv_bytes=4096 * 64,
                                    host_kv_bytes=4096 * 96))
    try:
        for prompt_len in (10, 100, 200):  # the device tier holds 256 tokens x 4 layers
            room = engine.max_model_len - prompt_len
            req = GenerateRequest("r", [3] * prompt_len, SamplingParams(max_tokens=room), fit_max_tokens=True)
            m = fitting_max_tokens(engine, req)
            assert 1 <= m < room  # these tiers hold far less than the 2,048-token context
            engine.add_request(req.prompt_token_ids, replace(req.params, max_tokens=m), request_id="fits")
            engine.abort_request("fits")
            with pytest.raises(ValueError, match="KV"):
                engine.add_request(req.prompt_token_ids, replace(req.params, max_tokens=m + 1))
        too_long = GenerateRequest("r", [3] * 1000, SamplingParams(max_tokens=1000), fit_max_tokens=True)
        assert fitting_max_tokens(engine, too_long) == 1  # fits nowhere: the engine's refusal says why
    finally:
        engine.close()


def test_chat_without_max_tokens_runs_on_a_small_device_tier():
    """deployments/config.yaml's 48 MiB device tier under no-offload: ~1,000 tokens of SmolLM2, far
    less than its 8,192-token context (which the request used to be sized as, and refused)."""
    args = AppArgs(engine={"kv_policy": "no-offload", "device_kv_bytes": 48 << 20, "host_kv_bytes": 1 << 20})
    seen: list[GenerateRequest] = []

    async def main():
        ae = AsyncEngine(LLMEngine(args.engine_config())).start()

        async def generate(req):
            seen.append(req)
            async for d in ae.stream(req):
                yield d
        app = build_api(OpenAIService(args, generate))
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
                body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Count to 1000."}],
                        "stream": True, "temperature": 0}
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    status = r.status_code
                    async for line in r.aiter_lines():
                        if '"content"' in line and '"content":""' not in line:
                            break  # one token is proof enough; leaving aborts the rest
            kv = ae.engine.kv
            state = await _settle(ae)
            return status, kv.block_bytes, ae.engine.spec.num_layers, ae.engine.config.block_size, state
        finally:
            ae.shutdown(timeout_s=5.0)

    status, block_bytes, layers, block_size, (unfinished, device) = asyncio.run(main())
    assert status == 200
    req = seen[0]
    held = (48 << 20) // block_bytes // layers * block_size  # tokens per request, every layer on device
    assert req.fit_max_tokens and req.params.max_tokens == held - req.num_prompt_tokens
    assert (unfinished, device) == (False, 0)


async def _settle(ae: AsyncEngine, timeout_s: float = 10.0) -> tuple[bool, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        unfinished, kv = await asyncio.wrap_future(
            ae.call(lambda e: (e.has_unfinished_requests(), e.kv_stats()["device_kv_bytes_used"])))
        if not unfinished or time.monotonic() > deadline:
            return unfinished, kv
        await asyncio.sleep(0.02)
