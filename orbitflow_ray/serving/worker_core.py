"""A serving worker without Ray: one engine on its thread, telemetry to the central planner,
speculative plans from it, and the routing stats the request router reads.

The planner is reached through `PlannerClient` (two coroutines); the Ray deployment passes one
backed by a DeploymentHandle, tests pass one backed by an in-process `CentralPlanner`. Nothing
here ever waits for the planner: reports go out in the background (one at a time, skipped while
one is in flight), and remote plans are taken only if they are back in time (see
`planner/ahead.py`).

What runs where: this worker's policy solves arrivals, finishes, pauses and capacity events on the
spot with its fast path (deterministic budget); its plan-window and drift re-plans go to the
central planner, which solves them with the cvxpy ILP (`planner/ilp_compact.py`): the policy asks
for the batch it predicts at the window's end, as many steps ahead as the measured round trip
needs (`planner/ahead.py`), and adopts the answer when it is back by then for the batch running. Telemetry carries which solver made the plan in force (`plan_solver`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import resource
import time
from typing import Hashable, Protocol

from orbitflow_ray.config import EngineConfig
from orbitflow_ray.engine import LLMEngine
from orbitflow_ray.planner.base import CapacityView, RequestView, policy_options
from orbitflow_ray.planner.planning import RemotePlan, planning_of
from orbitflow_ray.serving.engine_loop import AsyncEngine
from orbitflow_ray.serving.messages import PolicySpec, RoutingAdvice, SolveRequest, WorkerTelemetry

log = logging.getLogger(__name__)


class PlannerClient(Protocol):
    async def report(self, telemetry: WorkerTelemetry) -> RoutingAdvice: ...
    async def solve(self, request: SolveRequest) -> RemotePlan: ...


class WorkerCore:
    def __init__(self, config: EngineConfig, worker_id: str, planner: PlannerClient | None = None,
                 telemetry_period_s: float = 0.5, solve_timeout_s: float = 5.0,
                 max_waiting: int | None = None) -> None:
        if telemetry_period_s <= 0 or solve_timeout_s <= 0:
            raise ValueError("telemetry_period_s and solve_timeout_s must be positive")
        self.worker_id = worker_id
        self.planner = planner
        self.max_waiting = max_waiting
        self.telemetry_period_s, self.solve_timeout_s = telemetry_period_s, solve_timeout_s
        self.engine = LLMEngine(config)
        self.policy_spec = PolicySpec.of(config.kv_policy, self.engine.spec.num_layers, policy_options(config))
        self.advice: RoutingAdvice | None = None
        self.last: WorkerTelemetry | None = None
        self.stats = {"reports_sent": 0, "reports_failed": 0, "remote_solves_failed": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = False
        self._last_report = 0.0
        self._steps_at, self._time_at = 0, time.perf_counter()
        self.core: AsyncEngine | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> WorkerCore:
        self._loop = loop
        planning = planning_of(self.engine.policy)
        if self.planner is not None and planning is not None:
            planning.attach_remote(self._remote_solve)
        self.core = AsyncEngine(self.engine, on_boundary=self._boundary, max_waiting=self.max_waiting).start()
        return self

    # ---- engine thread -------------------------------------------------------------------------
    def _boundary(self, engine: LLMEngine) -> None:
        now = time.perf_counter()
        if now - self._last_report < self.telemetry_period_s:
            return
        self._last_report = now
        steps = engine.num_steps - self._steps_at
        mean_step = (now - self._time_at) / steps if steps else None
        self._steps_at, self._time_at = engine.num_steps, now
        self.last = self.telemetry(mean_step)
        if self.planner is not None and not self._in_flight and self._loop is not None:
            self._in_flight = True
            asyncio.run_coroutine_threadsafe(self._send(self.last), self._loop)

    def telemetry(self, mean_step_s: float | None = None) -> WorkerTelemetry:
        """The worker's state now (engine thread only)."""
        e, snap = self.engine, self.engine.snapshot()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return WorkerTelemetry(self.worker_id, time.time(), self.policy_spec, snap.running, snap.num_waiting,
                               snap.num_paused, snap.capacity, e.cost.model, e.max_model_len,
                               {**snap.kv, "rss_peak_bytes": rss}, snap.policy_stats, mean_step_s,
                               snap.plan_solver, e.policy.prefill_load())

    def _remote_solve(self, key: Hashable, views: list[RequestView], cap: CapacityView, pinned: frozenset[str],
                      budget_s: float | None) -> concurrent.futures.Future:
        """`RemoteSolve` for this worker's policy: the request goes out on the event loop."""
        req = SolveRequest(self.worker_id, key, tuple(views), cap, frozenset(pinned), self.engine.cost.model,
                           self.policy_spec, budget_s, self.engine.policy.prefill_load())
        return asyncio.run_coroutine_threadsafe(self._solve(req), self._loop)

    # ---- asyncio side --------------------------------------------------------------------------
    async def _send(self, t: WorkerTelemetry) -> None:
        try:
            self.advice = await asyncio.wait_for(self.planner.report(t), self.solve_timeout_s)
            self.stats["reports_sent"] += 1
        except Exception as e:  # the planner is down or restarting: keep serving, retry next period
            self.stats["reports_failed"] += 1
            log.warning("telemetry to the planner failed (%r); serving on local plans", e)
        finally:
            self._in_flight = False

    async def _solve(self, req: SolveRequest) -> RemotePlan:
        try:
            return await asyncio.wait_for(self.planner.solve(req), self.solve_timeout_s)
        except Exception:
            self.stats["remote_solves_failed"] += 1
            raise

    def routing_stats(self, advice_ttl_s: float = 10.0) -> dict:
        """What the request router reads (through Serve's record_routing_stats)."""
        stats: dict = {"worker_id": self.worker_id}
        t = self.last
        if t is not None:
            free = t.kv.get("device_kv_bytes_capacity", 0) - t.kv.get("device_kv_bytes_used", 0)
            stats.update(running=len(t.running), waiting=t.num_waiting, free_device_kv_bytes=free)
        a = self.advice
        if a is not None and time.time() - a.made_at < advice_ttl_s:
            stats.update(probe_tokens=list(a.probe_tokens), damage=list(a.damage), advice_version=a.version)
        return stats
