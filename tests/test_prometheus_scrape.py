"""A real Prometheus, configured from cluster/prometheus.yml, scrapes OrbitFlow's metrics off Ray's
endpoint, and every expression of the Grafana dashboard runs on what it scraped.

    .venv/bin/python -m pytest -q tests/test_prometheus_scrape.py

Needs the `prometheus` binary (Debian's `prometheus` package); as root it is installed with
apt-get when missing, otherwise the tests skip.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")
yaml = pytest.importorskip("yaml")

from orbitflow_ray.dashboard import DEFAULT_DASHBOARD, load_dashboard  # noqa: E402
from serve_util import free_port, serve_app, wait_for as _wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cluster" / "prometheus.yml"
MODEL = "smollm2-135m"
# Dashboard variables as Grafana would expand them ("All"), for a 1 s scrape interval.
_VARS = {"$model": ".*", "$worker": ".*", "$__rate_interval": "10s", "$__range": "5m"}


def _install_prometheus() -> str:
    why = "the prometheus binary is missing and could not be installed with apt-get"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{why} (not root, or no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]):
        r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        if r.returncode:
            pytest.skip(f"{why}: `{' '.join(cmd)}` exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return shutil.which("prometheus") or pytest.skip(f"{why}: apt-get installed no prometheus on PATH")


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    return shutil.which("prometheus") or _install_prometheus()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def prometheus(prometheus_bin, metrics_port, tmp_path_factory):
    """Prometheus on loopback, scraping Ray's endpoint every second with the shipped job."""
    tmp = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "ray" and job["static_configs"] == [{"targets": ["localhost:8080"]}]
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_port}"]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen([prometheus_bin, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready():
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            try:
                return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(ready, 30, "Prometheus to be ready")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def app(prometheus, metrics_port):
    args = {"model": MODEL, "torch_threads": 1, "telemetry_period_s": 0.3,
            "engine": {"device_kv_bytes": 32 << 20, "host_kv_bytes": 256 << 20, "tpot_slo_s": 0.5}}
    workers = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    with serve_app(args, workers, num_cpus=2, metrics_port=metrics_port) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def _query(base: str, expr: str) -> list[dict]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", (expr, r)
    return r["data"]["result"]


def _value(base: str, expr: str) -> float:
    result = _query(base, expr)
    return float(result[0]["value"][1]) if result else math.nan


def _complete(client, n: int) -> None:
    for i in range(n):
        r = client.completions.create(model=MODEL, prompt="The capital of France is" + " really" * i, max_tokens=8)
        assert r.usage.completion_tokens > 0


def test_config_files_pass_promtool(prometheus_bin, tmp_path):
    promtool = Path(prometheus_bin).with_name("promtool")
    if not promtool.exists():
        pytest.skip("no promtool beside the prometheus binary")
    text = CONFIG.read_text()
    assert "/tmp/ray/prom_metrics_service_discovery.json" in text
    # The commented-out alternative: Ray's service-discovery file instead of the static target.
    lines = [ln for ln in text.splitlines() if "static_configs" not in ln and "targets:" not in ln]
    sd = "\n".join(ln.replace("    # ", "    ", 1) if ln.lstrip("# ").startswith(("file_sd_configs", "- files",
                                                                                      "refresh_interval")) else ln
                   for ln in lines)
    (tmp_path / "sd.yml").write_text(sd)
    assert yaml.safe_load(sd)["scrape_configs"][0]["file_sd_configs"][0]["files"] == [
        "/tmp/ray/prom_metrics_service_discovery.json"]
    for path in (CONFIG, tmp_path / "sd.yml"):
        r = subprocess.run([str(promtool), "check", "config", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_orbitflow_metrics_reach_prometheus_and_every_panel_query_runs(app, prometheus):
    _complete(app, 2)
    _wait_for(lambda: _value(prometheus, "sum(ray_orbitflow_ttft_seconds_count)") > 0, 60,
              "ray_orbitflow_ttft_seconds_count in Prometheus")
    # Requests after the series exists, so its rate (and so the panels' quantiles) is not zero.
    _complete(app, 2)
    p50 = 'histogram_quantile(0.5, sum by (le) (rate(ray_orbitflow_ttft_seconds_bucket[10s])))'
    assert _wait_for(lambda: _value(prometheus, p50) > 0, 30, "a TTFT P50 from the histogram") < 60

    names = set(httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()["data"])
    seen_by_now = {"ray_orbitflow_ttft_seconds_bucket", "ray_orbitflow_tpot_seconds_bucket",
                   "ray_orbitflow_tbt_seconds_bucket", "ray_orbitflow_slo_requests_total", "ray_orbitflow_kv_bytes",
                   "ray_orbitflow_kv_capacity_bytes", "ray_orbitflow_requests", "ray_orbitflow_generated_tokens_total",
                   "ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas"}
    assert seen_by_now <= names, seen_by_now - names
    slos = {s["metric"]["slo"] for s in _query(prometheus, "sum by (slo) (ray_orbitflow_slo_requests_total)")}
    assert slos == {"ttft", "tpot", "tbt"}  # RequestRecord.slo_met: every SLO kind judged

    dash = load_dashboard(DEFAULT_DASHBOARD)
    for panel in (p for p in dash["panels"] if p["type"] != "row"):
        for t in panel["targets"]:
            expr = t["expr"]
            for var, value in _VARS.items():
                expr = expr.replace(var, value)
            _query(prometheus, expr)  # parses and runs
    healthy = _query(prometheus, "sum by (deployment) (ray_serve_deployment_replica_healthy)")
    assert {s["metric"]["deployment"]: float(s["value"][1]) for s in healthy}["OrbitFlowWorker"] == 1
