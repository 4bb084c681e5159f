"""Solving one step ahead: planning runs on a background thread on the predicted next batch.

Decoding never waits for a speculative solve: a result is taken at a step boundary only when it is
finished and was solved for the batch that is actually running. Anything unpredictable (an
arrival, a finish, a block boundary that breaks capacity) is solved on the spot. Every solve is
timed, hidden or not, and both totals are reported: the solve's cost is never subtracted.
One lock serialises the solver (its warm-start state is not thread-safe).

A serving worker may set `remote`: speculative solves then go to the central planner (a Ray Serve
deployment) instead of the local thread, and come back as `RemotePlan`s carrying the planner's plan
version. The worker still never waits: an answer that is late, lost or for another batch is
ignored and the step solves locally, exactly as when a local speculation misses. `stats` counts
central plans used (`remote_plans_used`), not back in time (`remote_plans_late`) and solved for a
batch that did not happen (`remote_plans_other_batch`).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, TypeVar

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class RemotePlan:
    """A plan solved by the central planner for one worker's predicted batch `key`."""

    version: int
    key: Hashable
    result: Any  # what the local solve would have returned: (Plan, paused ids)


class AheadSolver(Generic[R]):
    def __init__(self, solve: Callable[..., R], background: bool = True) -> None:
        self._solve = solve
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="orbitflow-plan") if background else None
        self._pending: tuple[Hashable, Future] | None = None
        # (key, *args) -> Future of a RemotePlan; set by a serving worker (see the module doc).
        self.remote: Callable[..., Future] | None = None
        self.stats = {"solves_sync": 0, "solves_ahead": 0, "solves_ahead_used": 0,
                      "solve_s_sync": 0.0, "solve_s_ahead": 0.0, "solve_s_max": 0.0,
                      "solves_remote": 0, "remote_plans_used": 0, "remote_plans_late": 0,
                      "remote_plans_other_batch": 0, "plan_version": 0}
        self._remote_pending = False

    def _timed(self, kind: str, *args) -> R:
        with self._lock:
            t0 = time.perf_counter()
            try:
                return self._solve(*args)
            finally:
                dt = time.perf_counter() - t0
                self.stats[f"solves_{kind}"] += 1
                self.stats[f"solve_s_{kind}"] += dt
                self.stats["solve_s_max"] = max(self.stats["solve_s_max"], dt)

    def solve_now(self, *args) -> R:
        return self._timed("sync", *args)

    def submit(self, key: Hashable, *args) -> None:
        """Start solving for a predicted state `key` (replaces any earlier speculation)."""
        if self.remote is not None:
            self.stats["solves_remote"] += 1
            self._pending, self._remote_pending = (key, self.remote(key, *args)), True
            return
        if self._pool is None:
            return
        self._pending = (key, self._pool.submit(self._timed, "ahead", *args))
        self._remote_pending = False

    def take(self, key: Hashable) -> R | None:
        """The speculative result for `key` if it is ready; None otherwise (never blocks)."""
        if self._pending is None:
            return None
        if self._pending[0] != key or not self._pending[1].done():
            if self._remote_pending:
                self.stats["remote_plans_other_batch" if self._pending[0] != key else "remote_plans_late"] += 1
            return None
        fut = self._pending[1]
        self._pending = None
        if fut.exception() is not None:
            return None  # the caller solves on the spot, where the error is handled
        result = fut.result()
        if isinstance(result, RemotePlan):
            if result.key != key:
                return None
            self.stats["remote_plans_used"] += 1
            self.stats["plan_version"] = result.version
            return result.result
        self.stats["solves_ahead_used"] += 1
        return result

    def pending(self, key: Hashable) -> bool:
        return self._pending is not None and self._pending[0] == key

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
