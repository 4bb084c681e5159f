"""The ingress deployment: the OpenAI API (`orbitflow_ray/serving/api.py`) over the worker
deployment, reached through a streaming handle routed by `SLOFeasibilityRouter`."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from orbitflow_ray.serving.api import build_api
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.serving.messages import GenerateRequest, StreamDelta, WorkerOverloaded
from orbitflow_ray.serving.openai_service import OpenAIService
from orbitflow_ray.serving.protocol import ServiceUnavailableError


@serve.deployment(name="OrbitFlowIngress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class OrbitFlowIngress:
    def __init__(self, args: dict, worker: DeploymentHandle, planner: DeploymentHandle | None = None) -> None:
        self.args = AppArgs.model_validate(args)
        self.worker = worker.options(stream=True)
        self.planner = planner
        self.service = OpenAIService(self.args, self._generate)

    async def _generate(self, req: GenerateRequest) -> AsyncIterator[StreamDelta]:
        gen = self.worker.generate.remote(req)
        try:
            async for delta in gen:
                yield delta
        except BackPressureError as e:  # Serve's queue in front of the workers is full
            raise WorkerOverloaded(str(e)) from None
        finally:
            gen.cancel()  # a client gone mid-stream: the worker aborts the request at its next step

    async def _state(self) -> dict:
        if self.planner is None:
            return {"workers": {}, "planner": "disabled"}
        try:  # the planner may be restarting: answer 503 rather than wait on it
            return await asyncio.wait_for(self.planner.state.remote(), 5.0)
        except Exception as e:
            raise ServiceUnavailableError(f"the planner is unavailable ({type(e).__name__}); retry shortly",
                                          retry_after_s=1) from None

    def __serve_build_asgi_app__(self):
        return build_api(self.service, self._state)
