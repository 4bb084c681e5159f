"""An LLMEngine on its own thread, driven from asyncio: the core of a serving worker.

Why a thread: a step is tens to hundreds of milliseconds of torch compute, and the event loop
must stay free to take requests, stream tokens and answer health checks meanwhile. The engine is
not thread-safe, so only the engine thread touches it: the asyncio side enqueues commands (add,
abort, call) that the thread runs at the next step boundary. That is also where an abandoned
stream's KV is freed: a client that disconnects is aborted at the next boundary.

Streams go through Token-Deposit: a token leaves at its release time, which is when it was computed
unless the plan banks it to cover a stall it predicts (`planner/deposit.py`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from orbitflow_ray.engine import LLMEngine
from orbitflow_ray.outputs import RequestOutput
from orbitflow_ray.request import Request
from orbitflow_ray.serving.messages import GenerateRequest, StreamDelta, WorkerOverloaded

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an error; the worker must be replaced."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    accepted: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_boundary: Callable[[LLMEngine], None] | None = None,
                 idle_poll_s: float = 0.05, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting  # bounded admission queue: past it, WorkerOverloaded
        self.on_boundary = on_boundary  # runs on the engine thread after every step and when idle
        self.idle_poll_s = idle_poll_s
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="orbitflow-engine", daemon=True)

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def check_health(self) -> None:
        if not self.alive:
            raise EngineDeadError(f"engine thread is not running: {self.error!r}")

    # ---- the asyncio side ----------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine produces them (not paced). Raises ValueError if the
        engine refuses the request; aborts it if the consumer stops early."""
        stream = await self._accept(req)
        async for out in self._outputs(req, stream):
            yield out

    async def stream(self, req: GenerateRequest, on_finish: Callable[[RequestOutput], None] | None = None
                     ) -> AsyncIterator[StreamDelta]:
        """Deltas of text and token ids, each released at its Token-Deposit release time. The first
        delta (empty) says the engine accepted the request; `on_finish` sees the final output (its
        metrics) before the last delta goes out; an exception it raises is logged, the stream goes on."""
        stream = await self._accept(req)
        finished = False
        try:  # from acceptance on, a consumer that leaves aborts the request (its KV is freed)
            yield StreamDelta("", [], prompt_tokens=req.num_prompt_tokens)
            detok = _Detokenizer(req.params.stop)
            sent = 0
            async for out in self._released(req, stream):
                new = out.token_ids[sent:]
                sent = len(out.token_ids)
                text = detok.delta(out.text, out.finished)
                finished = out.finished
                if out.finished and on_finish is not None:
                    try:
                        on_finish(out)
                    except Exception:  # a metrics hook's bug must not cost the client its answer
                        log.exception("on_finish hook failed for %s; its answer goes out anyway", req.request_id)
                if new or text or out.finished:
                    lps = out.logprobs[len(out.token_ids) - len(new):] if out.logprobs is not None else None
                    yield StreamDelta(text, list(new), out.finished, out.finish_reason,
                                      len(out.prompt_token_ids), len(out.token_ids), lps)
        finally:
            if not finished:
                self.abort(req.request_id)

    async def _accept(self, req: GenerateRequest) -> _Stream:
        self.check_health()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._put(("add", req, stream))
        try:
            await asyncio.wrap_future(stream.accepted)
        except asyncio.CancelledError:  # the client left before the engine took it
            self.abort(req.request_id)
            raise
        return stream

    async def _released(self, req: GenerateRequest, stream: _Stream) -> AsyncIterator[RequestOutput]:
        """The outputs in order, each once its newest token's Token-Deposit release time has come
        (at once when the request is not paced). Release times are read from the newest output
        the engine has sent: a banked token's release may move earlier after its own output (the
        bank outgrew its target, or the request finished), never later."""
        pending: collections.deque[RequestOutput] = collections.deque()
        latest: list[float] = []
        finished = False
        while pending or not finished:
            item = None
            if pending:
                i = len(pending[0].token_ids) - 1
                wait = latest[i] - time.perf_counter() if req.paced and 0 <= i < len(latest) else 0.0
                if wait <= 0:
                    yield pending.popleft()
                    continue
                try:  # a newer output may release it earlier: wait for that or for its time
                    item = await asyncio.wait_for(stream.queue.get(), wait)
                except asyncio.TimeoutError:
                    continue
            else:
                item = await stream.queue.get()
            if isinstance(item, BaseException):
                raise item
            finished = item.finished
            latest = item.metrics.release_times
            pending.append(item)

    async def _outputs(self, req: GenerateRequest, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(req.request_id)

    def abort(self, request_id: str) -> None:
        self._put(("abort", request_id))

    def call(self, fn: Callable[[LLMEngine], object]) -> concurrent.futures.Future:
        """Run `fn(engine)` on the engine thread at the next step boundary."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._put(("call", fn, fut))
        return fut

    def _put(self, cmd: tuple) -> None:
        """Enqueue for the engine thread; if it is dead, fail the command now (no one would)."""
        self._cmds.put(cmd)
        if self.error is not None or (self._thread.ident is not None and not self._thread.is_alive()):
            self._fail_commands(EngineDeadError(f"engine is not running: {self.error!r}"))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(("wake",))
        self._thread.join(timeout_s)
        self.engine.close()

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._deliver(out)
                if self.on_boundary is not None:
                    self.on_boundary(self.engine)
        except BaseException as e:  # the worker is broken: fail every stream, let Serve replace it
            log.exception("engine thread died")
            self.error = e
            err = EngineDeadError(f"engine failed: {e!r}")
            for s in list(self._streams.values()):
                try:
                    s.loop.call_soon_threadsafe(s.queue.put_nowait, err)
                except RuntimeError:  # that consumer's loop is closed already
                    pass
            self._streams.clear()
            self._fail_commands(err)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=self.idle_poll_s) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _arrival(self, req: GenerateRequest) -> float | None:
        """`req`'s ingress arrival on the engine's clock (None: no ingress time, it arrives now), so
        the scheduler's TTFT slack counts the time it spent before this worker took it."""
        if not req.arrival_unix:
            return None
        return self.engine.scheduler.clock() - max(0.0, time.time() - req.arrival_unix)

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, req, stream = cmd
            # Running from here on, so the client's cancel can no longer void the future under us;
            # False: it left before the engine took it (its abort command follows): nothing to add.
            if not stream.accepted.set_running_or_notify_cancel():
                return
            waiting = len(self.engine.scheduler.waiting)
            if self.max_waiting is not None and waiting >= self.max_waiting:
                stream.accepted.set_exception(WorkerOverloaded(
                    f"worker is full: {waiting} requests already wait for a slot"))
                return
            try:
                if req.fit_max_tokens:  # never under min_tokens: then check_fits says why it cannot run
                    fit = max(fitting_max_tokens(self.engine, req), req.params.min_tokens)
                    req.params = replace(req.params, max_tokens=fit)
                self.engine.add_request(req.prompt_token_ids, req.params, request_id=req.request_id,
                                        arrival_time=self._arrival(req))
            except Exception as e:  # bad input: this request fails, nothing else is touched
                stream.accepted.set_exception(e)
                return
            self._streams[req.request_id] = stream
            stream.accepted.set_result(None)
        elif kind == "abort":
            if self.engine.abort_request(cmd[1]):
                log.info("aborted %s (client gone); its KV is freed", cmd[1])
            self._streams.pop(cmd[1], None)
        elif kind == "call":
            _, fn, fut = cmd
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:
                fut.set_exception(e)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        except RuntimeError:  # the consumer's event loop is gone: nobody will read this request
            self._streams.pop(out.request_id, None)
            self.engine.abort_request(out.request_id)

    def _fail_commands(self, err: Exception) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add" and cmd[2].accepted.set_running_or_notify_cancel():
                cmd[2].accepted.set_exception(err)
            elif cmd[0] == "call":
                cmd[2].set_exception(err)


def fitting_max_tokens(engine: LLMEngine, req: GenerateRequest) -> int:
    """The largest max_tokens, at most `req.params.max_tokens`, with which the request passes the
    engine's admission check (`Scheduler.check_fits`: its KV at its longest, under the policy's
    placement for it, fits each tier on its own). The check only gets harder as max_tokens grows, so
    a binary search finds the bound in ~13 cheap checks. 1 if nothing fits: the engine then refuses
    the request with the reason."""
    def fits(n: int) -> bool:
        sp = replace(req.params, max_tokens=n, min_tokens=min(n, req.params.min_tokens))
        probe = Request(req.request_id, req.prompt_token_ids, sp)
        try:
            engine.scheduler.check_fits(probe)
        except ValueError:
            return False
        return True

    lo, hi = 1, req.params.max_tokens
    if fits(hi):
        return hi
    while hi - lo > 1:  # invariant: lo fits (or is 1), hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class _Detokenizer:
    """Text deltas that never take back what was sent: a trailing partial UTF-8 character, and the
    last len(longest stop) - 1 characters (a stop string may be forming), wait for the next token."""

    def __init__(self, stops: list[str]) -> None:
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0

    def delta(self, text: str, finished: bool) -> str:
        end = len(text)
        if not finished:
            end = max(self.sent, end - self.hold)
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        out = text[self.sent:end]
        self.sent = max(self.sent, end)
        return out
