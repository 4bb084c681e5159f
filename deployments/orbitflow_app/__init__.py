"""The OrbitFlow Ray Serve application: ingress (OpenAI API), workers (engines), central planner."""

from deployments.orbitflow_app.builder import build_app, build_app_with_options

__all__ = ["build_app", "build_app_with_options"]
