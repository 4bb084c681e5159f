"""`orbitflow dashboard push`: upload OrbitFlow's Grafana dashboard through Grafana's HTTP API.

    orbitflow dashboard push --grafana-url http://grafana:3000 --api-key "$GRAFANA_TOKEN" --folder OrbitFlow

The dashboard (cluster/grafana/orbitflow-dashboard.json) reads Prometheus through a datasource
variable, so it needs no editing per Grafana. Pushing again overwrites the dashboard with the same
uid, wherever it is, and moves it to --folder (created when missing; omitted: the General folder).
The key is a Grafana service account token (or API key) allowed to write dashboards (Editor).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "grafana" / "orbitflow-dashboard.json"


class DashboardError(Exception):
    """A push that failed for a reason the user can act on; the message says which."""


def load_dashboard(path: str | Path) -> dict:
    p = Path(path)
    try:
        dash = json.loads(p.read_text())
    except OSError as e:
        raise DashboardError(f"cannot read the dashboard {p}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DashboardError(f"{p} is not JSON: {e}") from None
    if not isinstance(dash, dict) or not dash.get("uid") or not isinstance(dash.get("panels"), list):
        raise DashboardError(f"{p} is not a Grafana dashboard: it needs a 'uid' and a 'panels' list")
    return dash


def _api(grafana_url: str, api_key: str, timeout_s: float):
    try:
        from grafana_client import GrafanaApi
    except ImportError:
        raise DashboardError("the grafana-client package is missing: pip install grafana-client") from None

    parts = urlsplit(grafana_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DashboardError(f"--grafana-url must be an http(s) URL such as http://grafana:3000, got {grafana_url!r}")
    try:
        parts.port
    except ValueError:
        raise DashboardError(f"--grafana-url has a bad port: {grafana_url!r}") from None
    if not api_key:
        raise DashboardError("no API key: pass --api-key or set GRAFANA_TOKEN")
    # grafana-client appends "api" to the URL's path as is: a sub-path needs its trailing slash.
    url = parts._replace(path=parts.path.rstrip("/") + "/" if parts.path.strip("/") else "").geturl()
    return GrafanaApi.from_url(url, credential=api_key, timeout=timeout_s)


def _not_grafana(where: str) -> DashboardError:
    return DashboardError(f"{where} did not answer like Grafana's HTTP API: is the URL right?")


def _folder_uid(api, title: str, where: str) -> str:
    folders = api.folder.get_all_folders()
    if not isinstance(folders, list):
        raise _not_grafana(where)
    for f in folders:
        if isinstance(f, dict) and f.get("title") == title:
            return f["uid"]
    return api.folder.create_folder(title)["uid"]


def push_dashboard(grafana_url: str, api_key: str, dashboard: dict, folder: str | None = None,
                   timeout_s: float = 10.0) -> dict:
    """Create or overwrite `dashboard` (matched by its uid); returns Grafana's answer
    (`uid`, `url`, `version`, `status`)."""
    api = _api(grafana_url, api_key, timeout_s)
    from grafana_client.client import GrafanaClientError, GrafanaException

    # grafana-client < 4 has no timeout error: its timeouts are OSErrors, caught below.
    timeout_error = getattr(sys.modules["grafana_client.client"], "GrafanaTimeoutError", ())

    where = f"Grafana at {grafana_url}"
    try:
        # id: None, so Grafana matches by uid (an id copied from another Grafana would clash).
        body = {"dashboard": {**dashboard, "id": None}, "overwrite": True,
                "message": "orbitflow dashboard push"}
        if folder:
            body["folderUid"] = _folder_uid(api, folder, where)
        out = api.dashboard.update_dashboard(body)
    except GrafanaClientError as e:
        if e.status_code == 401:
            raise DashboardError(f"{where} rejected the API key (401 Unauthorized): check --api-key") from None
        if e.status_code == 403:
            raise DashboardError(f"{where} refused (403 Forbidden): the key needs the Editor role "
                                 "(write dashboards, create folders)") from None
        hint = " (is the URL right?)" if e.status_code == 404 else ""
        raise DashboardError(f"{where} answered {e.status_code}{hint}: {str(e.message)[:200]}") from None
    except timeout_error:
        raise DashboardError(f"{where} did not answer within {timeout_s:g} s") from None
    except GrafanaException as e:
        raise DashboardError(f"{where}: {e.message}") from None
    except json.JSONDecodeError:
        # Checked before OSError: the HTTP library's JSON errors are both.
        raise _not_grafana(where) from None
    except OSError as e:
        raise DashboardError(f"cannot reach {where}: {e}") from None
    if not isinstance(out, dict):
        raise _not_grafana(where)
    return out


def cmd_push(args: argparse.Namespace) -> int:
    try:
        dash = load_dashboard(args.dashboard)
        out = push_dashboard(args.grafana_url, args.api_key, dash, args.folder, args.timeout)
    except DashboardError as e:
        print(f"orbitflow: error: {e}", file=sys.stderr)
        return 1
    link = args.grafana_url.rstrip("/") + out["url"] if str(out.get("url", "")).startswith("/") else out.get("url")
    print(f"pushed {dash.get('title', dash['uid'])!r} (uid {out.get('uid', dash['uid'])}, "
          f"version {out.get('version', '?')}) to {args.folder or 'General'}: {link}")
    return 0


def add_dashboard_commands(sub) -> None:
    d = sub.add_parser("dashboard", help="Grafana dashboard for OrbitFlow's Prometheus metrics",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = d.add_subparsers(dest="dashboard_command", metavar="{push}", required=True)
    p = actions.add_parser("push", help="upload the dashboard to Grafana (overwrites the same uid)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grafana-url", default=os.environ.get("GRAFANA_URL"), required="GRAFANA_URL" not in os.environ,
                   help="Grafana's base URL, e.g. http://grafana:3000 or https://host/grafana (default: $GRAFANA_URL)")
    p.add_argument("--api-key", default=os.environ.get("GRAFANA_TOKEN"), required="GRAFANA_TOKEN" not in os.environ,
                   help="service account token or API key with the Editor role, sent as 'Authorization: Bearer' "
                        "(default: $GRAFANA_TOKEN, which keeps it out of shell history)")
    p.add_argument("--folder", default=None,
                   help="folder title to put the dashboard in, created if missing (default: General)")
    p.add_argument("--dashboard", default=str(DEFAULT_DASHBOARD),
                   help="dashboard JSON file (default: cluster/grafana/orbitflow-dashboard.json of this checkout)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each API call (default: 10)")
    p.set_defaults(func=cmd_push)
