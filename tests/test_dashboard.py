"""The Grafana dashboard: its JSON is sound and names only metrics that exist, and
`orbitflow dashboard push` makes the Grafana API calls it should, against a fake Grafana.

    .venv/bin/python -m pytest -q tests/test_dashboard.py
"""

from __future__ import annotations

import ast
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from orbitflow_ray.cli import main
from orbitflow_ray.dashboard import DEFAULT_DASHBOARD, DashboardError, load_dashboard, push_dashboard

ROOT = Path(__file__).resolve().parents[1]
METRICS_PY = ROOT / "deployments" / "orbitflow_app" / "metrics.py"
KEY = "glsa_test_key"

# Serve's metrics the dashboard uses, as exported (Ray prefixes `ray_`) -> (name in Ray's source, kind).
# Checked against Ray 2.60's source below, and seen on a live scrape (tests/test_prometheus_scrape.py).
RAY_METRICS = {
    "ray_serve_deployment_replica_healthy": ("serve_deployment_replica_healthy", "Gauge"),
    "ray_serve_autoscaling_target_replicas": ("serve_autoscaling_target_replicas", "Gauge"),
}
_FUNCS = {"histogram_quantile", "sum", "max", "min", "avg", "count", "rate", "increase", "irate", "clamp_min"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def orbitflow_metric_names() -> set[str]:
    """The names Ray exports for every metric metrics.py creates: `ray_` + name; counters end in
    `_total` (added when missing), histograms come as `_bucket`, `_sum` and `_count`."""
    names = set()
    for node in ast.walk(ast.parse(METRICS_PY.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args \
                and node.func.id in ("Counter", "Gauge", "Histogram"):
            name = "ray_" + node.args[0].value
            if node.func.id == "Counter":
                names.add(name if name.endswith("_total") else name + "_total")
            elif node.func.id == "Histogram":
                names |= {name + s for s in ("_bucket", "_sum", "_count")}
            else:
                names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (fails on a function it does not know)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", e):
        tok = m.group()
        if e[m.end():].lstrip().startswith("("):
            assert tok in _FUNCS, f"unknown PromQL function {tok!r} in {expr!r}"
        elif tok not in _KEYWORDS:
            names.add(tok)
    return names


def panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


@pytest.fixture(scope="module")
def dash() -> dict:
    return load_dashboard(DEFAULT_DASHBOARD)


def test_metrics_py_parses_to_the_names_ray_exports():
    names = orbitflow_metric_names()
    assert {"ray_orbitflow_ttft_seconds_bucket", "ray_orbitflow_slo_requests_total", "ray_orbitflow_kv_bytes",
            "ray_orbitflow_link_bytes_total", "ray_orbitflow_planner_solves_total"} <= names
    assert not any(n.endswith("_total_total") for n in names)


def test_ray_metrics_exist_in_rays_source():
    import ray

    source = "\n".join(p.read_text() for p in (Path(ray.__file__).parent / "serve").rglob("*.py"))
    for exported, (name, kind) in RAY_METRICS.items():
        assert exported == "ray_" + name
        assert re.search(rf'metrics\.{kind}\(\s*"{name}"', source), f"{kind} {name} not in Ray's source"


def test_dashboard_layout(dash):
    assert dash["uid"] == "orbitflow-serving" and 36 <= dash["schemaVersion"] <= 41
    assert dash["id"] is None
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["w"] > 0 and g["h"] > 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    var_names = [v["name"] for v in dash["templating"]["list"]]
    assert var_names[0] == "datasource" and dash["templating"]["list"][0]["type"] == "datasource"
    for p in panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in var_names or var.startswith("__"), f"{p['title']}: unknown variable ${var}"


def test_every_expression_names_only_existing_metrics(dash):
    known = orbitflow_metric_names() | set(RAY_METRICS)
    used = set()
    for p in panels(dash):
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names, f"{p['title']}: no metric in {t['expr']!r}"
            assert names <= known, f"{p['title']}: unknown metrics {names - known}"
            used |= names
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", v["query"]["query"])
            assert m and metric_names(m.group(1)) <= known, v["name"]
    wanted = {f"ray_orbitflow_{n}_seconds_bucket" for n in ("ttft", "tpot", "tbt", "planner_solve")}
    wanted |= {"ray_orbitflow_slo_requests_total", "ray_orbitflow_kv_bytes", "ray_orbitflow_link_bytes_total",
               "ray_orbitflow_plan_solve_seconds_total", "ray_orbitflow_requests",
               "ray_serve_deployment_replica_healthy"}
    assert wanted <= used, f"no panel shows {wanted - used}"


def test_metric_name_parser():
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x=~"$m", y="b c"}[5m])))') == {"a_bucket"}
    assert metric_names("sum by (slo) (increase(a_total[$__range])) / sum without (w) (b)") == {"a_total", "b"}
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        metric_names("nosuchfunc(a)")


# --- push, against a fake Grafana ------------------------------------------------------------

class FakeGrafana(ThreadingHTTPServer):
    """Grafana's folder and dashboard API, as much as the push uses; records every request."""

    def __init__(self, prefix: str = ""):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.prefix, self.calls, self.folders, self.dashboards = prefix, [], [], {}
        self.url = f"http://127.0.0.1:{self.server_address[1]}{prefix}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeGrafana

    def log_message(self, *args):
        pass

    def _answer(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        s = self.server
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        path = self.path.split("?")[0]
        s.calls.append({"method": method, "path": path, "auth": self.headers.get("Authorization"), "body": body})
        if not path.startswith(s.prefix + "/api/"):
            return self._answer(404, {"message": "Not found"})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._answer(401, {"message": "Invalid API key"})
        route = (method, path[len(s.prefix):])
        if route == ("GET", "/api/folders"):
            return self._answer(200, s.folders)
        if route == ("POST", "/api/folders"):
            folder = {"id": len(s.folders) + 1, "uid": f"f{len(s.folders) + 1}", "title": body["title"]}
            s.folders.append(folder)
            return self._answer(200, folder)
        if route == ("POST", "/api/dashboards/db"):
            d = body["dashboard"]
            old = s.dashboards.get(d["uid"])
            if old and not body.get("overwrite"):
                return self._answer(412, {"message": "The dashboard has been changed by someone else",
                                          "status": "version-mismatch"})
            version = old["version"] + 1 if old else 1
            s.dashboards[d["uid"]] = {"version": version, "body": body}
            return self._answer(200, {"id": 7, "uid": d["uid"], "url": f"/d/{d['uid']}/orbitflow-serving",
                                      "status": "success", "version": version, "slug": "orbitflow-serving"})
        return self._answer(404, {"message": "Not found"})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


@pytest.fixture
def grafana(request):
    server = FakeGrafana(getattr(request, "param", ""))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_push_creates_the_folder_then_overwrites_the_same_uid(grafana, dash):
    out = push_dashboard(grafana.url, KEY, dash, folder="OrbitFlow")
    assert out["uid"] == dash["uid"] and out["version"] == 1
    assert [(c["method"], c["path"]) for c in grafana.calls] == [
        ("GET", "/api/folders"), ("POST", "/api/folders"), ("POST", "/api/dashboards/db")]
    assert all(c["auth"] == f"Bearer {KEY}" for c in grafana.calls)
    assert grafana.calls[1]["body"] == {"title": "OrbitFlow"}
    body = grafana.calls[2]["body"]
    assert body["overwrite"] is True and body["folderUid"] == "f1"
    assert body["dashboard"] == {**dash, "id": None}

    grafana.calls.clear()
    again = push_dashboard(grafana.url, KEY, dash, folder="OrbitFlow")
    assert [(c["method"], c["path"]) for c in grafana.calls] == [("GET", "/api/folders"), ("POST", "/api/dashboards/db")]
    assert again["uid"] == dash["uid"] and again["version"] == 2
    assert len(grafana.folders) == 1 and list(grafana.dashboards) == [dash["uid"]]


def test_cli_push_without_folder_goes_to_general(grafana, capsys):
    assert main(["dashboard", "push", "--grafana-url", grafana.url, "--api-key", KEY]) == 0
    assert [c["path"] for c in grafana.calls] == ["/api/dashboards/db"]
    assert "folderUid" not in grafana.calls[0]["body"]
    assert f"{grafana.url}/d/orbitflow-serving/" in capsys.readouterr().out


@pytest.mark.parametrize("grafana", ["/grafana"], indirect=True)
def test_push_to_grafana_under_a_sub_path(grafana, dash):
    assert push_dashboard(grafana.url, KEY, dash, folder="OrbitFlow")["version"] == 1
    assert {c["path"] for c in grafana.calls} == {"/grafana/api/folders", "/grafana/api/dashboards/db"}


def test_cli_bad_key_is_a_clear_error(grafana, capsys):
    rc = main(["dashboard", "push", "--grafana-url", grafana.url, "--api-key", "wrong", "--folder", "OrbitFlow"])
    err = capsys.readouterr().err
    assert rc == 1 and "401 Unauthorized" in err and "--api-key" in err
    assert grafana.calls[0]["auth"] == "Bearer wrong" and not grafana.dashboards


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url, message", [
    ("grafana:3000", r"must be an http\(s\) URL"),
    ("http://127.0.0.1:99999", "bad port"),
    ("http://127.0.0.1:{closed}", "cannot reach Grafana"),
])
def test_bad_urls_are_clear_errors(url, message, dash):
    with pytest.raises(DashboardError, match=message):
        push_dashboard(url.format(closed=_closed_port()), KEY, dash, timeout_s=5)


def test_silent_server_times_out_with_a_clear_error(dash):
    with socket.socket() as s:  # accepts connections (backlog), never answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(DashboardError, match="did not answer within|timed out"):
            push_dashboard(f"http://127.0.0.1:{s.getsockname()[1]}", KEY, dash, timeout_s=0.5)


def test_not_grafana_is_a_clear_error(grafana, dash):
    with pytest.raises(DashboardError, match=r"404 \(is the URL right\?\)"):
        push_dashboard(grafana.url + "/elsewhere", KEY, dash)


def test_cli_help_and_bad_dashboard_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["dashboard", "push", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f in out for f in ("--grafana-url", "--api-key", "--folder", "--dashboard"))
    bad = tmp_path / "d.json"
    bad.write_text("{}")
    assert main(["dashboard", "push", "--grafana-url", "http://127.0.0.1:1", "--api-key", KEY,
                 "--dashboard", str(bad)]) == 1
    assert "not a Grafana dashboard" in capsys.readouterr().err
