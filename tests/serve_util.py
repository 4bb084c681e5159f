"""Helpers shared by the tests that run the Ray Serve app on local Ray (over the load-test
harness's own app management, `load_tests/app.py`)."""

from __future__ import annotations

import contextlib
import time

from load_tests.app import AppSpec, ManagedApp, fetch_state, free_port

__all__ = ["free_port", "planner_state", "serve_app", "wait_for"]


def wait_for(pred, timeout_s: float, what: str, poll_s: float = 0.3):
    """Poll `pred` until it returns something truthy (returned), or fail saying what was awaited."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def planner_state(base: str) -> dict:
    """GET /v1/orbitflow/state; an empty view while the planner is unreachable (killed, restarting),
    so polling loops wait instead of failing on one timed-out call."""
    return fetch_state(base) or {"workers": {}}


@contextlib.contextmanager
def serve_app(args: dict, worker_options: dict | None = None, num_cpus: int = 4,
              metrics_port: int | None = None):
    """Local Ray + the OrbitFlow app on a free port; yields the base URL; shuts both down."""
    extra = {"_metrics_export_port": metrics_port} if metrics_port is not None else {}
    spec = AppSpec("tests", args=args, worker_options=worker_options or {})
    with ManagedApp(spec, port=0, ray_options={"num_cpus": num_cpus, **extra}) as app:
        app.deploy()
        yield app.url
