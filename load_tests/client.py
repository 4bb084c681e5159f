"""An async open-loop client for any OpenAI-compatible streaming endpoint (OrbitFlow, vLLM, ...).

    results = asyncio.run(run_trace(trace, prompts, ClientConfig("http://127.0.0.1:8000", "smollm2-135m")))
    records = [r.record(default_tpot_slo_s=0.25) for r in results if not r.warmup]

Each trace request is sent at its arrival time, whatever happened to the earlier ones (open loop),
with `stream: true`, `ignore_eos: true` and max_tokens = its output length. A request beyond the
concurrency cap waits client-side; that wait is recorded apart, and the request's latencies run
from when it was sent. Every streamed content chunk's arrival time is a token time; the final
usage chunk cross-checks the count. A request that errors or times out is a failed record with
its error, never dropped. All times are seconds from the start of the run (the trace's clock).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
from tqdm.auto import tqdm

from orbitflow_ray.metrics import RequestRecord
from orbitflow_ray.sim.workload import TraceRequest

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(slots=True)
class ClientConfig:
    base_url: str
    model: str
    api_key: str | None = None
    endpoint: str = "completions"  # or "chat"
    max_concurrency: int | None = None  # None: no cap
    timeout_s: float = 600.0  # per request, from when it is sent
    send_slo: bool = True  # the `slo` extension field (other servers ignore or reject it)
    warmup_s: float = 0.0  # requests arriving before this are sent but not reported

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {self.endpoint!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if not self.timeout_s > 0 or self.warmup_s < 0:
            raise ValueError("timeout_s must be positive and warmup_s >= 0")
        self.base_url = self.base_url.rstrip("/").removesuffix("/v1")


@dataclass(slots=True)
class RequestResult:
    """What the client saw of one request."""

    request: TraceRequest
    prompt_tokens: int  # as built; the server's count (usage) wins when it sends one
    warmup: bool = False
    sent_s: float | None = None  # None: never sent (it failed waiting for a slot)
    token_times: list[float] = field(default_factory=list)
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def client_wait_s(self) -> float | None:
        return None if self.sent_s is None else self.sent_s - self.request.arrival_s

    @property
    def count_mismatch(self) -> bool:
        """The content chunks and the server's usage disagree on the number of output tokens."""
        n = self.usage_completion_tokens
        return n is not None and n != len(self.token_times)

    def record(self, default_tpot_slo_s: float, default_ttft_slo_s: float | None = None) -> RequestRecord:
        r = self.request
        arrival = self.sent_s if self.sent_s is not None else r.arrival_s
        return RequestRecord(r.request_id, arrival, self.usage_prompt_tokens or self.prompt_tokens,
                             tuple(self.token_times), r.tpot_slo_s or default_tpot_slo_s,
                             r.ttft_slo_s or default_ttft_slo_s, finished=self.ok and bool(self.token_times))

    def to_dict(self) -> dict:
        rec = self.record(float("inf"))
        return {"request_id": self.request.request_id, "arrival_s": self.request.arrival_s,
                "sent_s": self.sent_s, "client_wait_s": self.client_wait_s, "warmup": self.warmup,
                "input_tokens": self.request.input_tokens, "output_tokens": self.request.output_tokens,
                "prompt_tokens": self.usage_prompt_tokens or self.prompt_tokens,
                "tokens_received": len(self.token_times), "usage_completion_tokens": self.usage_completion_tokens,
                "ttft_s": rec.ttft_s, "tpot_s": rec.tpot_s, "finish_reason": self.finish_reason,
                "error": self.error,
                # when each output token arrived, seconds after the request was sent (TBT gaps, pacing)
                "token_times_s": [t - (self.sent_s or 0.0) for t in self.token_times]}


def request_body(cfg: ClientConfig, req: TraceRequest, prompt: str) -> dict:
    body = {"model": cfg.model, "max_tokens": req.output_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    slo = {k: v for k, v in (("ttft_s", req.ttft_slo_s), ("tpot_s", req.tpot_slo_s)) if v is not None}
    if cfg.send_slo and slo:
        body["slo"] = slo
    return body


class _Run:
    """One run's shared state: the session, the cap, the clock, the progress bar."""

    def __init__(self, cfg: ClientConfig, session: aiohttp.ClientSession, bar: tqdm) -> None:
        self.cfg, self.session, self.bar = cfg, session, bar
        self.slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        self.headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.t0 = time.perf_counter()
        self.in_flight = self.failed = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def send(self, res: RequestResult, prompt: str) -> RequestResult:
        try:
            if self.slots is None:
                await self._send(res, prompt)
            else:
                async with self.slots:
                    await self._send(res, prompt)
        except asyncio.CancelledError:
            res.error = "cancelled before it finished"
            raise
        finally:
            self.failed += not res.ok
            self.bar.update(1)
            self.bar.set_postfix(in_flight=self.in_flight, failed=self.failed, refresh=False)
        return res

    async def _send(self, res: RequestResult, prompt: str) -> None:
        res.sent_s = self.now()
        self.in_flight += 1
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                await self._stream(res, request_body(self.cfg, res.request, prompt))
        except TimeoutError:
            res.error = f"timed out after {self.cfg.timeout_s:g} s ({len(res.token_times)} tokens received)"
        except (aiohttp.ClientError, ValueError) as e:  # refused, reset, malformed stream data
            res.error = f"{type(e).__name__}: {e}"
        except Exception as e:  # anything else still fails this request alone, with its error
            res.error = f"unexpected {type(e).__name__}: {e}"
        finally:
            self.in_flight -= 1

    async def _stream(self, res: RequestResult, body: dict) -> None:
        url = self.cfg.base_url + ENDPOINTS[self.cfg.endpoint]
        async with self.session.post(url, json=body, headers=self.headers) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {_error_message(await resp.text())}"
                return
            done = False
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments, keep-alives
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                self._chunk(res, json.loads(data))
                if res.error:
                    return
            if not done:
                res.error = f"stream ended without [DONE] ({len(res.token_times)} tokens received)"
            elif res.finish_reason is None:
                res.error = f"stream ended without a finish_reason ({len(res.token_times)} tokens received)"

    def _chunk(self, res: RequestResult, chunk: dict) -> None:
        t = self.now()
        if "error" in chunk:  # an error event mid-stream (OrbitFlow and vLLM both send one)
            res.error = f"error mid-stream: {_error_message(json.dumps(chunk))}"
            return
        usage = chunk.get("usage")
        if usage:
            res.usage_prompt_tokens = usage.get("prompt_tokens")
            res.usage_completion_tokens = usage.get("completion_tokens")
        for choice in chunk.get("choices") or []:
            text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
            if text:
                res.token_times.append(t)
            if choice.get("finish_reason"):
                res.finish_reason = choice["finish_reason"]


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err or text)[:500]
    except (ValueError, AttributeError):
        return text.strip()[:500] or "(empty body)"


async def run_trace(trace: list[TraceRequest], prompts: list[str], cfg: ClientConfig,
                    progress: bool = True, desc: str = "load test") -> list[RequestResult]:
    """Send every request of `trace` at its arrival time; the results in trace order."""
    if len(prompts) != len(trace):
        raise ValueError(f"{len(trace)} requests but {len(prompts)} prompts")
    connector = aiohttp.TCPConnector(limit=0)  # aiohttp's default of 100 connections would cap us silently
    bar = tqdm(total=len(trace), desc=desc, unit="req", disable=not progress)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        run = _Run(cfg, session, bar)
        tasks = []
        for req, prompt in zip(trace, prompts):
            delay = req.arrival_s - run.now()
            if delay > 0:
                await asyncio.sleep(delay)
            res = RequestResult(req, req.input_tokens, warmup=req.arrival_s < cfg.warmup_s)
            tasks.append(asyncio.create_task(run.send(res, prompt)))
        results = await asyncio.gather(*tasks)
    bar.close()
    return list(results)
