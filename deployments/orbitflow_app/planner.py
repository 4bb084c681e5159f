"""The central planner deployment: one replica around `CentralPlanner`, which solves the workers'
window and drift re-plans with the compact cvxpy ILP (HiGHS) and their routing probes with the
fast path, one at a time on the `PlanQueue` thread (waiting reports coalesced, superseded or
expired solve requests dropped). Serve restarts it when it dies; it holds only the latest report
of each worker, so the next round of reports rebuilds it."""

from __future__ import annotations

import asyncio

from ray import serve

from orbitflow_ray.planner.planning import RemotePlan
from orbitflow_ray.serving.central import CentralPlanner
from orbitflow_ray.serving.plan_queue import PlanQueue
from orbitflow_ray.serving.messages import RoutingAdvice, SolveRequest, WorkerTelemetry


@serve.deployment(name="OrbitFlowPlanner", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})  # reports arrive every 0.5 s per worker
class OrbitFlowPlanner:
    def __init__(self) -> None:
        from deployments.orbitflow_app.metrics import PlannerMetrics

        self.core = CentralPlanner()
        self.queue = PlanQueue(self.core).start()
        self.metrics = PlannerMetrics()

    # Every call waits on the one planning thread's queue (`PlanQueue`): the planner's state needs
    # no lock, a long solve never stalls the replica's event loop, and what waits is coalesced.
    async def report(self, telemetry: WorkerTelemetry) -> RoutingAdvice:
        advice = await asyncio.wrap_future(self.queue.report(telemetry))
        self.metrics.reports.inc()
        self.metrics.workers.set(len(self.core.workers))
        return advice

    async def solve(self, request: SolveRequest) -> RemotePlan:
        plan = await asyncio.wrap_future(self.queue.solve(request))
        if plan.result is not None:
            self.metrics.solves.inc(1, {"solver": plan.result.plan.solver})
            self.metrics.solve_s.observe(plan.solve_s)
        return plan

    def state(self) -> dict:
        return self.core.state()

    def __del__(self) -> None:
        queue = getattr(self, "queue", None)
        if queue is not None:
            queue.close()
