"""Solving ahead: planning runs off the decode thread on a predicted batch.

Decoding never waits for a speculative solve: a result is taken at a step boundary only when it is
finished and was solved for the batch that is actually running, or for that batch a few steps on
(`covers`: the same requests, none shorter than now; what fits and is on time at the longer contexts
is at the shorter ones, as KV bytes and step time grow with them), which is what a re-plan before
the step asked for (a drift, where the policy weighs it against the plan in force) gets. Anything
unpredictable (an arrival, an end of sequence, a pause, a block boundary that breaks capacity) is
solved on the spot. Every solve is timed, hidden or not, and both totals are reported: the solve's
cost is never subtracted. One lock serialises the solver (its warm-start state is not thread-safe).

A serving worker may attach a remote solver (`attach_remote`): speculative solves then go to the
central planner instead of the local thread, and come back as `RemotePlan`s carrying the planner's
plan version. A central solve takes far longer than a step, so the policy asks for it
`lead_steps` ahead: the measured round trip of earlier central solves over the measured step time
(x LEAD_MARGIN, plus one), for the batch it predicts at that step. The worker still never waits:
an answer that is late, lost, dropped by the planner, or for another batch is ignored and the
step solves locally, exactly as when a local speculation misses. `stats` counts central plans used
(`remote_plans_used`), not back in time (`remote_plans_late`), solved for a batch that did not
happen (`remote_plans_other_batch`), dropped unsolved by the planner (`remote_plans_dropped`),
failed (`remote_plans_failed`: the call raised or was cancelled, e.g. the planner actor died) and
replaced by a newer request before the step that needed them (`remote_plans_replaced`: the batch
changed first), a central plan counted at most once as missed (late or for another batch) or
replaced;
`remote_round_trip_s` and `remote_lead_steps` are the latest estimate and lead.
"""

from __future__ import annotations

import math
import operator
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Hashable, TypeVar

from orbitflow_ray.planner.planning import PlanResult, RemotePlan, RemoteSolve

__all__ = ["AheadSolver", "PlanResult", "RemotePlan", "LEAD_MARGIN"]

R = TypeVar("R")
LEAD_MARGIN = 1.5  # central round trips vary (queueing behind other workers' solves): ask early
EWMA = 0.3  # weight of the newest round trip in the estimate


class AheadSolver(Generic[R]):
    def __init__(self, solve: Callable[..., R], background: bool = True,
                 covers: Callable[[Hashable, Hashable], bool] = operator.eq) -> None:
        self._solve = solve
        self._covers = covers  # covers(solved_for, now): a plan solved for that state holds in this one
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="orbitflow-plan") if background else None
        self._pending: tuple[Hashable, Future] | None = None
        self.remote: RemoteSolve | None = None
        self.round_trip_s: float | None = None  # EWMA of central round trips (submit -> answer)
        self.stats = {"solves_sync": 0, "solves_ahead": 0, "solves_ahead_used": 0,
                      "solve_s_sync": 0.0, "solve_s_ahead": 0.0, "solve_s_max": 0.0,
                      "solves_remote": 0, "remote_plans_used": 0, "remote_plans_late": 0,
                      "remote_plans_other_batch": 0, "remote_plans_dropped": 0, "remote_plans_failed": 0,
                      "remote_plans_replaced": 0,
                      "plan_version": 0,
                      "remote_round_trip_s": 0.0, "remote_lead_steps": 0}
        self._remote_pending = False
        self._missed = False  # the pending remote plan was already counted late or for another batch

    def attach_remote(self, remote: RemoteSolve | None) -> None:
        self.remote = remote

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

    def lead_steps(self, step_s: float | None, most: int) -> int:
        """How many steps ahead to ask: 1 for the local thread; for the central planner the
        measured round trip over `step_s` (x LEAD_MARGIN, + 1), at most `most` (as early as
        possible while nothing is measured yet)."""
        if self.remote is None:
            return 1
        if self.round_trip_s is None or not step_s:
            lead = most
        else:
            lead = min(most, math.ceil(LEAD_MARGIN * self.round_trip_s / step_s) + 1)
        self.stats["remote_lead_steps"] = max(1, lead)
        return max(1, lead)

    def submit(self, key: Hashable, *args, budget_s: float | None = None) -> None:
        """Start solving for a predicted state `key` (replaces any earlier speculation); `budget_s`:
        seconds until the step that needs it (the central planner drops it unsolved past that)."""
        if self.remote is not None:
            if self._remote_pending and self._pending is not None and not self._missed:
                self.stats["remote_plans_replaced"] += 1  # the batch changed before it was needed
            self._missed = False
            self.stats["solves_remote"] += 1
            sent = time.perf_counter()
            fut = self.remote(key, *args, budget_s=budget_s)
            fut.add_done_callback(lambda f: self._measured(f, sent))
            self._pending, self._remote_pending = (key, fut), True
            return
        if self._pool is None:
            return
        self._pending = (key, self._pool.submit(self._timed, "ahead", *args))
        self._remote_pending = False

    def _measured(self, fut: Future, sent: float) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        if isinstance(fut.result(), RemotePlan) and fut.result().dropped is not None:
            return  # a dropped answer measures queueing, not a solve
        dt = time.perf_counter() - sent
        self.round_trip_s = dt if self.round_trip_s is None else (1 - EWMA) * self.round_trip_s + EWMA * dt
        self.stats["remote_round_trip_s"] = self.round_trip_s

    def take(self, key: Hashable) -> R | PlanResult | None:
        """The speculative result solved for `key`, or for a state that `covers` it, if it is
        ready; None otherwise (never blocks)."""
        if self._pending is None:
            return None
        solved_for, fut = self._pending
        usable = solved_for == key or self._covers(solved_for, key)
        if not usable or not fut.done():
            if self._remote_pending and not self._missed and (not usable or solved_for == key):
                self.stats["remote_plans_late" if usable else "remote_plans_other_batch"] += 1
                self._missed = True  # counted once: not again, nor "replaced" when a newer one follows
            return None  # (solved for a later step of this batch and not back yet: it stays pending)
        self._pending = None
        if fut.cancelled() or fut.exception() is not None:
            if self._remote_pending:
                self.stats["remote_plans_failed"] += 1
            return None  # the caller solves on the spot, where the error is handled
        result = fut.result()
        if isinstance(result, RemotePlan):
            if result.result is None:
                self.stats["remote_plans_dropped"] += 1
                return None
            if result.key != solved_for:
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
