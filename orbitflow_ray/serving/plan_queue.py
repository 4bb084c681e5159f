"""The central planner's work queue: one solve at a time on one thread, the latest first per worker.

Eight workers reporting every 0.5 s and asking for a plan per window outrun one planner whose ILP
takes about a second, so the queue keeps only what still matters. Per worker at most one report
and one solve request wait:

- a newer report replaces the waiting one (coalesced): every caller gets the advice solved from
  the newest, and its routing probes run once (one `admission_damage` call: the batch's own solve
  and the probes on one policy copy);
- a newer solve request replaces the waiting one (superseded): the worker has moved on to another
  predicted batch, so the older caller is answered at once, unsolved;
- solve requests go first, earliest deadline first (deadline = arrival + the worker's budget); one
  whose deadline passed while it waited is answered unsolved (expired) instead of being solved for
  a step that has already run; reports follow, oldest first, except that a report waiting longer
  than `report_max_wait_s` goes before the solves (routing advice must not starve).

An unsolved answer is a `RemotePlan` with `result=None` and `dropped` saying why; the worker counts
it (`remote_plans_dropped`) and solves on the spot, as for a late plan. `run_once` does one item
(tests drive it by hand, on a fake clock); `start` runs items on a background thread.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable

from orbitflow_ray.serving.central import DEADLINE_SHARE, CentralPlanner
from orbitflow_ray.serving.messages import SolveRequest, WorkerTelemetry

log = logging.getLogger(__name__)


class PlanQueue:
    def __init__(self, planner: CentralPlanner, clock: Callable[[], float] = time.monotonic,
                 report_max_wait_s: float = 2.0) -> None:
        if report_max_wait_s <= 0:
            raise ValueError("report_max_wait_s must be positive")
        self.planner, self.clock, self.report_max_wait_s = planner, clock, report_max_wait_s
        self._cv = threading.Condition()
        # worker -> (newest report, its callers, when the first of them arrived); arrival order
        self._reports: dict[str, tuple[WorkerTelemetry, list[Future], float]] = {}
        self._solves: dict[str, tuple[SolveRequest, float, Future]] = {}  # worker -> (req, deadline, fut)
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- callers (any thread) --------------------------------------------------------------------
    def report(self, t: WorkerTelemetry) -> Future:
        """Queue a report; the Future gets its `RoutingAdvice`."""
        fut: Future = Future()
        with self._cv:
            waiting = self._reports.get(t.worker_id)
            if waiting is None:
                self._reports[t.worker_id] = (t, [fut], self.clock())
            else:  # keeps its place in line
                self.planner.stats["reports_coalesced"] += 1
                self._reports[t.worker_id] = (t, waiting[1] + [fut], waiting[2])
            self._cv.notify()
        return fut

    def solve(self, req: SolveRequest) -> Future:
        """Queue a solve request; the Future gets its `RemotePlan` (solved, or dropped unsolved)."""
        fut: Future = Future()
        deadline = float("inf") if req.budget_s is None else self.clock() + req.budget_s
        with self._cv:
            waiting = self._solves.get(req.worker_id)
            self._solves[req.worker_id] = (req, deadline, fut)
            if waiting is not None:
                waiting[2].set_result(self.planner.dropped(waiting[0], "superseded"))
            self._cv.notify()
        return fut

    def waiting(self) -> tuple[int, int]:
        """(reports, solve requests) waiting now."""
        with self._cv:
            return len(self._reports), len(self._solves)

    # ---- the planning thread ---------------------------------------------------------------------
    def run_once(self) -> bool:
        """Do the most urgent waiting item; False if none waits."""
        with self._cv:
            oldest = next(iter(self._reports.values()), None)
            overdue = oldest is not None and self.clock() - oldest[2] > self.report_max_wait_s
            if self._solves and not overdue:
                wid = min(self._solves, key=lambda w: self._solves[w][1])
                req, deadline, fut = self._solves.pop(wid)
                item = ("solve", req, deadline, [fut])
            elif self._reports:
                t, futures, _ = self._reports.pop(next(iter(self._reports)))
                item = ("report", t, None, futures)
            else:
                return False
        kind, msg, deadline, futures = item
        try:
            if kind == "report":
                answer = self.planner.report(msg)
            else:
                left = deadline - self.clock()
                if left <= 0:
                    answer = self.planner.dropped(msg, "expired")
                else:
                    answer = self.planner.solve(msg, self._perf_deadline(msg, left))
        except Exception as e:  # the caller's timeout path handles it; the queue goes on
            log.exception("central %s for worker %s failed", kind, msg.worker_id)
            for f in futures:
                f.set_exception(e)
            return True
        for f in futures:
            f.set_result(answer)
        return True

    @staticmethod
    def _perf_deadline(req: SolveRequest, left_s: float) -> float | None:
        if req.budget_s is None:
            return None
        return time.perf_counter() + DEADLINE_SHARE * left_s

    def start(self) -> PlanQueue:
        self._thread = threading.Thread(target=self._run, name="orbitflow-central", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not (self._reports or self._solves):
                    self._cv.wait()
                if self._closed:
                    return
            self.run_once()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
