"""Access control and limits of the OpenAI API (issue 7), on the Ray-free app in-process."""

import asyncio

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

from orbitflow_ray.serving.api import build_api  # noqa: E402
from orbitflow_ray.serving.app_config import AppArgs  # noqa: E402
from orbitflow_ray.serving.central import InProcessPlanner  # noqa: E402
from orbitflow_ray.serving.openai_service import OpenAIService  # noqa: E402
from orbitflow_ray.serving.worker_core import WorkerCore  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "sk-test-0123456789"
MODEL = "smollm2-135m"


def _run(args: dict, scenario):
    """Start a worker and the API for `args`, run `scenario(app, core)`, shut down."""
    async def main():
        a = AppArgs.model_validate(args)
        core = WorkerCore(a.engine_config(), "w0", InProcessPlanner(), 0.2,
                          max_waiting=a.max_waiting_per_worker).start(asyncio.get_running_loop())
        try:
            return await scenario(build_api(OpenAIService(a, core.core.stream)), core)
        finally:
            core.core.shutdown()
    return asyncio.run(main())


def _client(app, key: str | None) -> "openai.AsyncOpenAI":
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=60)
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key=key or "none", http_client=http, max_retries=0)


def test_api_key_required_on_v1_routes_not_on_health():
    async def scenario(app, core):
        raw = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")
        assert (await raw.get("/health")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": KEY}):
            r = await raw.get("/v1/models", headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await _client(app, "wrong-key-123").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        r = await _client(app, KEY).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert r.usage.completion_tokens == 2
    _run({"api_key": KEY}, scenario)


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("ORBITFLOW_API_KEY", KEY)

    async def scenario(app, core):
        with pytest.raises(openai.AuthenticationError):
            await _client(app, None).models.list()
        assert [m.id for m in (await _client(app, KEY).models.list()).data] == [MODEL]
    _run({}, scenario)


def test_size_limits_are_400s():
    async def scenario(app, core):
        c = _client(app, None)
        with pytest.raises(openai.BadRequestError, match="at most 64"):
            await c.completions.create(model=MODEL, prompt="word " * 200, max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="limit of 8"):
            await c.completions.create(model=MODEL, prompt="hi", max_tokens=9)
        r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens <= 8  # no max_tokens: capped at the server's limit
    _run({"max_prompt_tokens": 64, "max_output_tokens": 8}, scenario)


def test_full_admission_queue_is_429_with_retry_after_and_loses_nothing():
    async def scenario(app, core):
        raw = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=120)
        body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 12, "ignore_eos": True}
        results = await asyncio.gather(*[raw.post("/v1/completions", json=body) for _ in range(12)])
        codes = sorted(r.status_code for r in results)
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
        for r in results:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["usage"]["completion_tokens"] == 12
        stats = await asyncio.wrap_future(core.core.call(lambda e: (e.kv_stats(), e.has_unfinished_requests())))
        assert stats[0]["device_kv_bytes_used"] == 0 and stats[0]["host_kv_bytes_used"] == 0
        assert not stats[1]
    # max_num_seqs 2 + 2 waiting: of 12 simultaneous requests, the rest are refused with 429.
    _run({"engine": {"kv_policy": "orbitflow", "max_num_seqs": 2}, "max_waiting_per_worker": 2}, scenario)
