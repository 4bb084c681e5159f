"""The OrbitFlow Ray Serve application: ingress (OpenAI API), workers (engines), central planner."""

from deployments.orbitflow_app.builder import build_app

__all__ = ["build_app"]
