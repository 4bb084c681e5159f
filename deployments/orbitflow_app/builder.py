"""Builds the OrbitFlow application.

    serve run deployments/config.yaml                      # Serve calls build_app(config's args)
    serve.run(build_app({"model": "smollm2-135m"}))        # from Python
    serve.run(build_app_with_options(args, {"num_replicas": 2}))

Serve's builder contract: an `import_path` names a function of exactly one parameter, the `args`
dict of the config (validated here by `AppArgs`). Deployment options (replicas, autoscaling, GPUs)
come from the config's `deployments:` section; from Python, `build_app_with_options` takes the
workers' options directly.
"""

from __future__ import annotations

from ray.serve import Application

from deployments.orbitflow_app.ingress import OrbitFlowIngress
from deployments.orbitflow_app.planner import OrbitFlowPlanner
from deployments.orbitflow_app.worker import OrbitFlowWorker
from orbitflow_ray.serving.app_config import AppArgs


def build_app(args: dict) -> Application:
    """The application for `args` (an `AppArgs` dict; `{}` for every default). Raises pydantic's
    ValidationError naming the bad field."""
    return build_app_with_options(args, None)


def build_app_with_options(args: dict | None, worker_options: dict | None) -> Application:
    """`build_app`, with Serve deployment options for the workers (`num_replicas`,
    `autoscaling_config`, `ray_actor_options`, ...) that a config file would set in `deployments:`."""
    a = AppArgs.model_validate(args or {})
    plain = a.model_dump()
    planner = OrbitFlowPlanner.bind() if a.planner else None
    worker = OrbitFlowWorker.options(**(worker_options or {})).bind(plain, planner)
    return OrbitFlowIngress.bind(plain, worker, planner)
