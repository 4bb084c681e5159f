"""The worker deployment: one replica = one engine (one GPU on a cluster). A thin shim over
`WorkerCore`; requests stream back as `StreamDelta`s."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from orbitflow_ray.planner.planning import RemotePlan
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.serving.messages import GenerateRequest, RoutingAdvice, SolveRequest, StreamDelta, WorkerTelemetry
from orbitflow_ray.serving.worker_core import WorkerCore

log = logging.getLogger(__name__)
ROUTER = "deployments.orbitflow_app.router:SLOFeasibilityRouter"


class HandlePlanner:
    """`PlannerClient` over the planner deployment's handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def report(self, telemetry: WorkerTelemetry) -> RoutingAdvice:
        return await self.handle.report.remote(telemetry)

    async def solve(self, request: SolveRequest) -> RemotePlan:
        return await self.handle.solve.remote(request)


# max_queued_requests bounds Serve's queue in front of the workers (past it the ingress answers 429).
@serve.deployment(name="OrbitFlowWorker", max_ongoing_requests=64, max_queued_requests=256,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16},
                  ray_actor_options={"num_cpus": 1},
                  request_router_config={"request_router_class": ROUTER, "request_routing_stats_period_s": 1.0},
                  health_check_period_s=2.0, health_check_timeout_s=10.0)
class OrbitFlowWorker:
    def __init__(self, args: dict, planner: DeploymentHandle | None = None) -> None:
        from deployments.orbitflow_app.metrics import WorkerMetrics

        a = AppArgs.model_validate(args)
        if a.torch_threads:
            import torch
            torch.set_num_threads(a.torch_threads)
        worker_id = serve.get_replica_context().replica_id.unique_id
        client = HandlePlanner(planner) if planner is not None and a.planner else None
        self.worker = WorkerCore(a.engine_config(), worker_id, client, a.telemetry_period_s,
                                 max_waiting=a.max_waiting_per_worker)
        self.metrics = WorkerMetrics(a.name, worker_id)
        self._metrics_task: asyncio.Task | None = None

    def _started(self) -> WorkerCore:
        if self.worker.core is None:
            loop = asyncio.get_running_loop()
            self.worker.start(loop)
            self._metrics_task = loop.create_task(self._export_metrics())
        return self.worker

    async def _export_metrics(self) -> None:
        while True:
            await asyncio.sleep(self.worker.telemetry_period_s)
            if self.worker.last is not None:
                try:
                    self.metrics.on_telemetry(self.worker.last)
                except Exception:  # metrics must never take serving down
                    log.exception("metrics export failed")

    async def generate(self, req: GenerateRequest) -> AsyncIterator[StreamDelta]:
        core = self._started().core
        async for delta in core.stream(req, on_finish=lambda out: self.metrics.on_finish(req, out)):
            yield delta

    async def stats(self) -> dict:
        """This worker's last telemetry, summarised (tests and operators)."""
        w = self._started()
        t = w.last
        return {"worker_id": w.worker_id, **(t.kv if t else {}), **(t.policy_stats if t else {}), **w.stats}

    async def record_routing_stats(self) -> dict:
        return self._started().routing_stats()

    async def check_health(self) -> None:
        self._started().core.check_health()

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None and worker.core is not None:
            worker.core.shutdown(timeout_s=2.0)
        elif worker is not None:  # never served: still stop the engine (and its shard actors)
            worker.engine.close()
