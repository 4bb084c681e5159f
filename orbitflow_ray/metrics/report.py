"""Report of a policy comparison: report.json, report.md and PNG plots from `sim.compare.run_grid` runs.

    from orbitflow_ray.metrics.report import write_report
    paths = write_report(runs, "runs/compare", context={"model": "llama-3.1-8b", "gpu": "A100"})

The tables are `metrics.tables`, the figures `metrics.plots` (the load tests' report uses both).
Missing or None metrics are skipped (a "-" in tables, no point in plots), so a partial grid still reports.
"""

from __future__ import annotations

import json
from pathlib import Path

from orbitflow_ray.metrics.plots import comparison_plots
from orbitflow_ray.metrics.tables import Grid, comparison_markdown, fmt_value, json_safe


def write_report(runs: list[dict], out_dir: str | Path, title: str = "OrbitFlow policy comparison",
                 context: dict | None = None) -> dict[str, Path]:
    """Write report.json, the plots and report.md (which links the plots) into out_dir; return {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = Grid(runs)
    paths = {"report.json": out / "report.json"}
    doc = {"runs": [{k: r.get(k) for k in ("policy", "rate", "slo_scale")} | {"metrics": r.get("metrics") or {}}
                    for r in runs], "context": context or {}}
    paths["report.json"].write_text(json.dumps(json_safe(doc), indent=1, default=str) + "\n")
    paths |= comparison_plots(grid, out)
    md = _markdown(runs, title, context or {}, [n for n in paths if n.endswith(".png")])
    paths["report.md"] = out / "report.md"
    paths["report.md"].write_text(md)
    return paths


def _markdown(runs: list[dict], title: str, context: dict, pngs: list[str]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {fmt_value(v)}" for k, v in context.items()] + ([""] if context else [])
    lines += comparison_markdown(runs)
    if pngs:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in pngs] + [""]
    return "\n".join(lines)
