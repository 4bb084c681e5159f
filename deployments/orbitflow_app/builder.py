"""Builds the OrbitFlow application: `serve run deployments/config.yaml`, or in Python
`serve.run(build_app({...}))`. Deployment options (replicas, autoscaling, GPUs) come from the
`deployments:` section of the Serve config; `args` is validated by `AppArgs`."""

from __future__ import annotations

from ray.serve import Application

from deployments.orbitflow_app.ingress import OrbitFlowIngress
from deployments.orbitflow_app.planner import OrbitFlowPlanner
from deployments.orbitflow_app.worker import OrbitFlowWorker
from orbitflow_ray.serving.app_config import AppArgs


def build_app(args: dict | None = None, worker_options: dict | None = None) -> Application:
    """`worker_options`: Serve deployment options for the workers when building from Python (a
    config file sets them in its `deployments:` section instead)."""
    a = AppArgs.model_validate(args or {})
    plain = a.model_dump()
    planner = OrbitFlowPlanner.bind() if a.planner else None
    worker = OrbitFlowWorker.options(**(worker_options or {})).bind(plain, planner)
    return OrbitFlowIngress.bind(plain, worker, planner)
