"""The load test's report, in the simulator's format: report.json ({"runs": [...], "context"}),
report.md and PNG plots, plus requests.jsonl (what the client saw of every request).

    paths = write_load_report(runs, "reports/x", context={"model": "smollm2-135m"})

A run is one policy's measurement (`load_tests.run.measure`): "policy", "rate", "slo_scale" (None:
the SLOs are absolute), "metrics" (`orbitflow_ray.metrics.summarize` plus client and server
figures), and with --compare-sim "predicted" (the simulator's metrics on the same trace). Keys
starting with "_" hold the per-request data the plots use and are not written to report.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from load_tests.plots import write_plots
from orbitflow_ray.metrics.tables import comparison_markdown, fmt_metric, fmt_value, json_safe

# (label, metric key, format) of the rows of the results table
ROWS = [("requests finished", "num_finished", "int"), ("requests failed", "num_failed", "int"),
        ("warm-up requests (not reported)", "num_warmup", "int"),
        ("goodput (req/s meeting TTFT, TPOT and TBT SLOs)", "goodput_req_s", "rate"),
        ("requests meeting all SLOs (of all)", "all_slo_attainment", "pct"),
        ("TTFT attainment", "ttft_attainment", "pct"), ("TPOT attainment", "tpot_attainment", "pct"),
        ("TBT attainment (tokens)", "tbt_attainment", "pct"),
        ("TBT attainment (requests, P99 gap)", "tbt_request_attainment", "pct"),
        ("P50 TTFT", "p50_ttft_s", "s"), ("P95 TTFT", "p95_ttft_s", "s"), ("P99 TTFT", "p99_ttft_s", "s"),
        ("P50 TPOT", "p50_tpot_s", "ms"), ("P95 TPOT", "p95_tpot_s", "ms"), ("P99 TPOT", "p99_tpot_s", "ms"),
        ("P50 TBT", "p50_tbt_s", "ms"), ("P95 TBT", "p95_tbt_s", "ms"), ("P99 TBT", "p99_tbt_s", "ms"),
        ("P95 TBT / SLO", "p95_tbt_over_slo", "ratio"), ("P95 end-to-end", "p95_e2e_s", "s"),
        ("throughput (in + out tok/s)", "throughput_tok_s", "num1"), ("output tok/s", "output_tok_s", "num1"),
        ("makespan", "makespan_s", "s"),
        ("P95 client-side wait (cap)", "p95_client_wait_s", "s"), ("max client-side wait", "max_client_wait_s", "s"),
        ("link bytes moved (H2D + D2H)", "link_bytes", "mib"),
        ("link bytes per output token", "link_bytes_per_output_token", "kib"),
        ("peak device KV", "peak_device_kv_bytes", "mib"), ("pauses (server)", "total_pauses", "int"),
        ("token-count mismatches (chunks vs usage)", "token_count_mismatches", "int")]
JSON_KEYS = ("policy", "rate", "slo_scale", "metrics", "predicted", "server_kv", "errors")


def write_load_report(runs: list[dict], out_dir: str | Path, title: str = "OrbitFlow load test",
                      context: dict | None = None) -> dict[str, Path]:
    """Write report.json, requests.jsonl, the plots and report.md into out_dir; return {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report.json": out / "report.json", "requests.jsonl": out / "requests.jsonl"}
    doc = {"runs": [{k: r[k] for k in JSON_KEYS if k in r} for r in runs], "context": context or {}}
    paths["report.json"].write_text(json.dumps(json_safe(doc), indent=1, default=str) + "\n")
    with open(paths["requests.jsonl"], "w") as fh:
        for r in runs:
            for res in r.get("_results", []):
                fh.write(json.dumps(json_safe({"policy": r["policy"], **res.to_dict()})) + "\n")
    paths |= write_plots(runs, out)
    paths["report.md"] = out / "report.md"
    paths["report.md"].write_text(_markdown(runs, title, context or {}, [n for n in paths if n.endswith(".png")]))
    return paths


def _markdown(runs: list[dict], title: str, context: dict, pngs: list[str]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {fmt_value(v)}" for k, v in context.items()] + ([""] if context else [])
    lines += ["## Results", "", *results_table(runs), ""]
    if any(r.get("predicted") for r in runs):
        lines += ["*simulated*: the same trace replayed in the simulator (`orbitflow_ray.sim`) with the app's "
                  "engine config; it does not model the client's concurrency cap.", ""]
    kv = [r for r in runs if r.get("server_kv")]
    if kv:
        lines += ["## Server KV (GET /v1/orbitflow/state, whole run incl. warm-up)", "", *_kv_table(kv), ""]
    if len(runs) > 1:
        lines += comparison_markdown([{k: r[k] for k in ("policy", "rate", "slo_scale", "metrics")}
                                      for r in runs], heading="Policy comparison")
    errors = [(r["policy"], e, n) for r in runs for e, n in (r.get("errors") or {}).items()]
    if errors:
        lines += ["## Errors", "", "| policy | requests | error |", "| --- | ---: | --- |"]
        lines += [f"| `{p}` | {n} | {e.replace('|', '/')} |" for p, e, n in errors] + [""]
    if pngs:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in pngs] + [""]
    return "\n".join(lines)


def results_table(runs: list[dict]) -> list[str]:
    """Metrics as rows; per policy a measured column and, with a prediction, a simulated one."""
    cols = []
    for r in runs:
        cols.append((f"`{r['policy']}` measured" if r.get("predicted") else f"`{r['policy']}`", r["metrics"]))
        if r.get("predicted"):
            cols.append((f"`{r['policy']}` simulated", r["predicted"]))
    head = ["metric"] + [c for c, _ in cols]
    rows = [[label] + [fmt(m.get(key), kind) for _, m in cols] for label, key, kind in ROWS]
    return ["| " + " | ".join(r) + " |" for r in [head, ["---"] + ["---:"] * len(cols), *rows]]


def _kv_table(runs: list[dict]) -> list[str]:
    keys = [("bytes H2D", "bytes_h2d", "mib"), ("bytes D2H", "bytes_d2h", "mib"),
            ("peak device KV", "device_kv_bytes_used_peak", "mib"), ("device KV capacity", "device_kv_bytes_capacity", "mib"),
            ("peak host KV", "host_kv_bytes_used_peak", "mib"), ("pauses", "num_pauses", "int"),
            ("preemptions", "num_preemptions", "int"), ("engine steps", "num_steps", "int"), ("workers", "workers", "int")]
    head = ["policy"] + [k for k, _, _ in keys]
    rows = [[f"`{r['policy']}`"] + [fmt(r["server_kv"].get(key), kind) for _, key, kind in keys] for r in runs]
    return ["| " + " | ".join(x) + " |" for x in [head, ["---"] + ["---:"] * len(keys), *rows]]


def fmt(x, kind: str) -> str:
    if x is None:
        return "-"
    if kind == "s":
        return f"{x:.2f} s"
    if kind == "ms":
        return f"{x * 1e3:.0f} ms"
    if kind == "mib":
        return f"{x / 2**20:,.1f} MiB"
    if kind == "kib":
        return f"{x / 2**10:,.1f} KiB"
    if kind == "num1":
        return f"{x:,.1f}"
    return fmt_metric(x, kind)


def headline(runs: list[dict], paths: dict[str, Path]) -> str:
    """A few lines for the terminal: where the report is and each policy's headline figures."""
    lines = [f"report: {paths['report.md']} (and report.json, {sum(n.endswith('.png') for n in paths)} plots)"]
    for r in runs:
        lines.append(f"  {r['policy']}: {_figures(r['metrics'])}")
        if r.get("predicted"):
            lines.append(f"  {'':{len(r['policy'])}}  simulated: {_figures(r['predicted'])}")
    return "\n".join(lines)


def _figures(m: dict) -> str:
    f = lambda key, kind: fmt(m.get(key), kind)  # noqa: E731
    text = (f"{m.get('num_finished')}/{m.get('num_requests')} finished; goodput {f('goodput_req_s', 'rate')} "
            f"req/s; attainment TTFT {f('ttft_attainment', 'pct')}, "
            f"TPOT {f('tpot_attainment', 'pct')}, TBT {f('tbt_attainment', 'pct')}; P95 TTFT {f('p95_ttft_s', 's')}, "
            f"TPOT {f('p95_tpot_s', 'ms')}, TBT {f('p95_tbt_s', 'ms')}; {f('throughput_tok_s', 'num1')} tok/s "
            f"({f('output_tok_s', 'num1')} out)")
    if m.get("link_bytes") is not None:
        text += f"; link {f('link_bytes', 'mib')}, peak device KV {f('peak_device_kv_bytes', 'mib')}"
    return text
