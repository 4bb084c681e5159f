"""The central planner deployment: one replica around `CentralPlanner`, which solves the workers'
window and drift re-plans with the compact cvxpy ILP (HiGHS) and their routing probes with the
fast path. Serve restarts it when it
dies; it holds only the latest report of each worker, so the next round of reports rebuilds it."""

from __future__ import annotations

from ray import serve

from orbitflow_ray.planner.ahead import RemotePlan
from orbitflow_ray.serving.central import CentralPlanner
from orbitflow_ray.serving.messages import RoutingAdvice, SolveRequest, WorkerTelemetry


@serve.deployment(name="OrbitFlowPlanner", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})  # reports arrive every 0.5 s per worker
class OrbitFlowPlanner:
    def __init__(self) -> None:
        from deployments.orbitflow_app.metrics import PlannerMetrics

        self.core = CentralPlanner()
        self.metrics = PlannerMetrics()

    # Plain (sync) methods: Serve runs them one at a time on a thread, so the planner's state
    # needs no lock and a long solve does not stall the replica's event loop.
    def report(self, telemetry: WorkerTelemetry) -> RoutingAdvice:
        advice = self.core.report(telemetry)
        self.metrics.reports.inc()
        self.metrics.workers.set(len(self.core.workers))
        return advice

    def solve(self, request: SolveRequest) -> RemotePlan:
        before = self.core.stats["solve_s_total"]
        plan = self.core.solve(request)
        self.metrics.solves.inc(1, {"solver": plan.result[0].solver})
        self.metrics.solve_s.observe(self.core.stats["solve_s_total"] - before)
        return plan

    def state(self) -> dict:
        return self.core.state()
