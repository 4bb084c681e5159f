"""Helpers shared by the tests that run the Ray Serve app on local Ray."""

from __future__ import annotations

import contextlib
import socket
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    import httpx2

    try:
        r = httpx2.get(f"{base}/v1/orbitflow/state", timeout=10)
    except httpx2.HTTPError:
        return {"workers": {}}
    return r.json() if r.status_code == 200 else {"workers": {}}


@contextlib.contextmanager
def serve_app(args: dict, worker_options: dict | None = None, num_cpus: int = 4,
              metrics_port: int | None = None):
    """Local Ray + the OrbitFlow app on a free port; yields the base URL; shuts both down."""
    import ray
    from ray import serve

    from deployments.orbitflow_app import build_app

    port = free_port()
    extra = {"_metrics_export_port": metrics_port} if metrics_port is not None else {}
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **extra)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args, worker_options), name="orbitflow", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
