"""The app under test: started from a Serve config file on a local Ray, or an endpoint already up.

    spec = load_serve_config("deployments/config.yaml")
    with ManagedApp(spec, port=0) as app:       # local Ray + Serve, the app deployed
        app.deploy("all-offload")               # redeploy with another KV policy
        print(app.url, fetch_state(app.url))

The config's application args go to `build_app_with_options` unchanged (the KV policy swapped in
when asked) with the workers' deployment options from the config. The planner's and ingress's options
are the code's (the shipped configs set the same).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orbitflow_ray.planner import split_policy
from orbitflow_ray.serving.app_config import AppArgs

IMPORT_PATH = "deployments.orbitflow_app:build_app"
WORKER = "OrbitFlowWorker"


@dataclass(slots=True)
class AppSpec:
    """What the harness takes from a Serve config file."""

    path: str
    name: str = "orbitflow"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = 8000
    proxy_location: str = "HeadOnly"
    args: dict = field(default_factory=dict)
    worker_options: dict = field(default_factory=dict)

    @property
    def app_args(self) -> AppArgs:
        return AppArgs.model_validate(self.args)

    def with_policy(self, policy: str | None) -> dict:
        args = with_policy(self.args, policy)
        AppArgs.model_validate(args)  # an unknown policy fails here, before anything is deployed
        return args


def with_policy(args: dict, policy: str | None) -> dict:
    """A copy of the app's `args` with `policy` as its KV policy: `name` or `name+admission`
    (`no-offload+slo`: the baseline under SLO-aware admission, as the simulator's grid names it),
    which sets `engine.kv_policy` and `engine.admission`. None: `args` as they are."""
    args = copy.deepcopy(args)
    if policy:
        name, admission = split_policy(policy)
        engine = args.setdefault("engine", {})
        engine["kv_policy"] = name
        if admission is not None:
            engine["admission"] = admission
    return args


def load_serve_config(path: str | Path) -> AppSpec:
    doc = yaml.safe_load(Path(path).read_text()) or {}
    apps = doc.get("applications") or []
    ours = [a for a in apps if a.get("import_path") == IMPORT_PATH]
    if not ours:
        raise ValueError(f"{path}: no application with import_path {IMPORT_PATH!r}")
    app = ours[0]
    http = doc.get("http_options") or {}
    workers = [d for d in app.get("deployments") or [] if d.get("name") == WORKER]
    options = {k: v for k, v in (workers[0] if workers else {}).items() if k != "name"}
    spec = AppSpec(str(path), app.get("name", "orbitflow"), app.get("route_prefix", "/"),
                   http.get("host", "127.0.0.1"), int(http.get("port", 8000)),
                   doc.get("proxy_location", "HeadOnly"), app.get("args") or {}, options)
    spec.app_args  # validate now: a bad config fails before Ray starts
    return spec


# Ray's own processes take ports at random between an ephemeral port the kernel gave them and 65535
# (ray/_private/node.py `_get_unused_port`), and its workers take 10002-19999 (`min/max_worker_port`).
# A port the kernel hands out (bind to 0) lies in that first range, so a Ray started after we chose it
# could take it first: then a gRPC server answers our HTTP (seen once on CI). Ports from 20000 up to
# the kernel's ephemeral range are neither.
_PORT_LOW = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, outside the ranges Ray's processes pick theirs from.

    Raises RuntimeError if none of 200 random tries in [20000, ephemeral low) is free."""
    high = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(_PORT_LOW, max(high, _PORT_LOW + 1))
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host} in [{_PORT_LOW}, {high})")


class ManagedApp:
    """A local Ray with Serve and the app, shut down on exit."""

    def __init__(self, spec: AppSpec, port: int | None = None, ready_timeout_s: float = 180.0,
                 ray_options: dict | None = None) -> None:
        self.spec = spec
        self.ray_options = ray_options or {}  # extra ray.init arguments (num_cpus, metrics port, ...)
        self.port = spec.port if port is None else (port or free_port(spec.host))
        self.ready_timeout_s = ready_timeout_s
        self.policy: str | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.spec.host in ("0.0.0.0", "::") else self.spec.host
        return f"http://{host}:{self.port}{self.spec.route_prefix.rstrip('/')}"

    def __enter__(self) -> ManagedApp:
        import ray
        from ray import serve

        _port_must_be_free(self.spec.host, self.port)
        # "local": our own Ray instance, even if someone else's runs on this machine.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 **self.ray_options)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(proxy_location=self.spec.proxy_location,
                    http_options={"host": self.spec.host, "port": self.port})
        return self

    def deploy(self, policy: str | None = None) -> None:
        """Deploy (or redeploy in place) the app, with `policy` (`name` or `name+admission`) as its
        KV policy if given."""
        from ray import serve

        from deployments.orbitflow_app import build_app_with_options

        args = self.spec.with_policy(policy)
        serve.run(build_app_with_options(args, self.spec.worker_options), name=self.spec.name,
                  route_prefix=self.spec.route_prefix)
        self.policy = AppArgs.model_validate(args).engine_config().kv_policy
        wait_ready(self.url, self.ready_timeout_s)

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _port_must_be_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            raise RuntimeError(f"port {port} on {host} is in use: pass --port 0 for a free one, "
                               "or --url to test the server already there") from None


def _get_json(url: str, timeout_s: float = 10.0) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_ready(url: str, timeout_s: float) -> None:
    """Until the endpoint lists its models (the proxy and the ingress are up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (_get_json(f"{url}/v1/models", 5.0) or {}).get("data"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready after {timeout_s:g} s")


def served_model(url: str) -> str | None:
    """The first model the endpoint lists (GET /v1/models), or None."""
    data = (_get_json(f"{url}/v1/models") or {}).get("data") or []
    return data[0].get("id") if data else None


def fetch_state(url: str) -> dict | None:
    """OrbitFlow's GET /v1/orbitflow/state (per worker KV bytes, link bytes, pauses); None elsewhere."""
    return _get_json(f"{url}/v1/orbitflow/state")


_COUNTERS = ("bytes_h2d", "bytes_d2h", "num_pauses", "num_preemptions", "num_steps")
_PEAKS = ("device_kv_bytes_used_peak", "host_kv_bytes_used_peak")


def kv_summary(before: dict | None, after: dict | None) -> dict | None:
    """The workers' KV traffic between two state snapshots: counters as increases summed over
    workers, peaks (since each worker started) of the workers that ran steps in between."""
    if not after or "workers" not in after:
        return None
    old = (before or {}).get("workers") or {}
    out: dict = {k: 0 for k in _COUNTERS} | {k: 0 for k in _PEAKS}
    active = 0
    for wid, w in after["workers"].items():
        prev = old.get(wid, {})
        deltas = {k: w.get(k, 0) - prev.get(k, 0) for k in _COUNTERS}
        if deltas["num_steps"] <= 0:
            continue  # a replica gone or idle (e.g. the previous policy's, not yet forgotten)
        active += 1
        for k, v in deltas.items():
            out[k] += v
        for k in _PEAKS:
            out[k] = max(out[k], w.get(k, 0))
        for k in ("device_kv_bytes_capacity", "host_kv_bytes_capacity"):
            out[k] = out.get(k, 0) + w.get(k, 0)
    out["workers"] = active
    out["link_bytes"] = out["bytes_h2d"] + out["bytes_d2h"]
    return out
