"""Report of a policy comparison: report.json, report.md and PNG plots from `compare.run_grid` runs.

    from orbitflow_ray.sim.report import write_report
    paths = write_report(runs, "runs/compare", context={"model": "llama-3.1-8b", "gpu": "A100"})

Missing or None metrics are skipped (a "-" in tables, no point in plots), so a partial grid still reports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")  # files only: no display on the simulation hosts
import matplotlib.pyplot as plt  # noqa: E402

DPI = 120
REFERENCE = "orbitflow"  # the policy compared against the best baseline
# (column header, metric key, formatter name) of each per-rate column in the markdown tables: goodput
# (requests meeting TTFT, TPOT and TBT SLOs per second) first, then each SLO's attainment and tail.
COLUMNS = [("goodput req/s", "goodput_req_s", "rate"), ("TTFT att.", "ttft_attainment", "pct"),
           ("P95 TTFT", "p95_ttft_s", "s"), ("TPOT att.", "tpot_attainment", "pct"),
           ("TBT att.", "tbt_attainment", "pct"), ("P95 TBT/SLO", "p95_tbt_over_slo", "ratio"),
           ("throughput tok/s", "throughput_tok_s", "num"), ("pauses", "total_pauses", "int"),
           ("failed", "num_failed", "int")]


def write_report(runs: list[dict], out_dir: str | Path, title: str = "OrbitFlow policy comparison",
                 context: dict | None = None) -> dict[str, Path]:
    """Write report.json, the plots and report.md (which links the plots) into out_dir; return {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = _Grid(runs)
    paths = {"report.json": out / "report.json"}
    doc = {"runs": [{k: r.get(k) for k in ("policy", "rate", "slo_scale")} | {"metrics": r.get("metrics") or {}}
                    for r in runs], "context": context or {}}
    paths["report.json"].write_text(json.dumps(json_safe(doc), indent=1, default=str) + "\n")
    for name, plot in (("attainment_vs_rate.png", _plot_attainment), ("tbt_cdf.png", _plot_tbt_cdf),
                       ("p95_vs_slo_scale.png", _plot_p95_vs_scale), ("throughput_vs_rate.png", _plot_throughput)):
        fig = plot(grid)
        if fig is not None:
            fig.savefig(out / name, dpi=DPI)
            plt.close(fig)
            paths[name] = out / name
    md = _markdown(grid, title, context or {}, [n for n in paths if n.endswith(".png")])
    paths["report.md"] = out / "report.md"
    paths["report.md"].write_text(md)
    return paths


class _Grid:
    """The runs indexed by (policy, rate, slo_scale), with the axes in a stable order."""

    def __init__(self, runs: list[dict]):
        self.policies = _unique(r["policy"] for r in runs)
        self.rates = sorted(_unique(r["rate"] for r in runs))
        self.scales = sorted(_unique(r["slo_scale"] for r in runs))
        self.runs = {(r["policy"], r["rate"], r["slo_scale"]): r for r in runs}
        self.mid_scale = self.scales[(len(self.scales) - 1) // 2] if self.scales else None
        self.top_rate = self.rates[-1] if self.rates else None

    def metric(self, policy: str, rate: float, scale: float, key: str) -> float | None:
        run = self.runs.get((policy, rate, scale))
        return finite(((run or {}).get("metrics") or {}).get(key))

    def series(self, policy: str, key: str, *, scale: float | None = None, rate: float | None = None):
        """(xs, ys) of a metric along rates (given a scale) or along scales (given a rate), None points dropped."""
        if rate is None:
            pts = [(x, self.metric(policy, x, scale, key)) for x in self.rates]
        else:
            pts = [(x, self.metric(policy, rate, x, key)) for x in self.scales]
        pts = [(x, y) for x, y in pts if y is not None]
        return [x for x, _ in pts], [y for _, y in pts]


# ---------------------------------------------------------------- markdown

def _markdown(grid: _Grid, title: str, context: dict, pngs: list[str]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {fmt_value(v)}" for k, v in context.items()] + ([""] if context else [])
    lines += _comparison(grid)
    if pngs:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in pngs] + [""]
    return "\n".join(lines)


def comparison_markdown(runs: list[dict], heading: str = "Policies") -> list[str]:
    """The policy tables and OrbitFlow's gains over the best baseline, as markdown lines. Runs
    without an SLO scale (slo_scale None: measured with absolute SLOs) get one table under `heading`."""
    return _comparison(_Grid(runs), heading)


LEGEND = ("*goodput*: requests per second meeting all three SLOs (TTFT; TPOT; TBT: the request's P99 gap "
          "within the SLO); *att.*: share of requests (TTFT, TPOT) or of tokens (TBT) meeting the SLO.")


def _comparison(grid: _Grid, heading: str = "Policies") -> list[str]:
    lines = [LEGEND, ""] if grid.runs else []
    for scale in grid.scales:
        lines += [f"## SLO scale {scale:g}" if scale is not None else f"## {heading}", "", *_table(grid, scale), ""]
    if REFERENCE in grid.policies:
        lines += ["## OrbitFlow vs best baseline", ""]
        for scale in grid.scales:
            lines += ([f"SLO scale {scale:g}:", ""] if scale is not None else []) + [*_gains(grid, scale), ""]
    return lines


def _table(grid: _Grid, scale: float) -> list[str]:
    head = ["policy"] + [f"{name} @{rate:g}/s" for rate in grid.rates for name, _, _ in COLUMNS]
    rows = [[f"`{p}`"] + [fmt_metric(grid.metric(p, rate, scale, key), kind) for rate in grid.rates
                          for _, key, kind in COLUMNS] for p in grid.policies]
    return ["| " + " | ".join(r) + " |" for r in [head, ["---"] + ["---:"] * (len(head) - 1), *rows]]


def _gains(grid: _Grid, scale: float) -> list[str]:
    """One bullet per rate: OrbitFlow minus the best baseline for each metric (each may be a different one)."""
    baselines = [p for p in grid.policies if not p.startswith(REFERENCE)]
    if not baselines:
        return ["- no baseline policy to compare with."]
    lines = []
    for rate in grid.rates:
        parts = []
        for label, key, higher_better, fmt in GAINS:
            ours = grid.metric(REFERENCE, rate, scale, key)
            best = _best(grid, baselines, rate, scale, key, higher_better)
            parts.append(f"{label} -" if ours is None or best is None
                         else f"{label} {fmt(ours, best[1])} (vs `{best[0]}`)")
        lines.append(f"- {rate:g} req/s: " + ", ".join(parts))
    return lines


def _best(grid: _Grid, policies: list[str], rate: float, scale: float, key: str,
          higher_better: bool) -> tuple[str, float] | None:
    vals = [(p, v) for p in policies if (v := grid.metric(p, rate, scale, key)) is not None]
    if not vals:
        return None
    return (max if higher_better else min)(vals, key=lambda pv: pv[1])


def _reduction(ours: float, best: float) -> str:
    """How much lower ours is than the best (a latency), or how much higher when it is worse."""
    if best <= 0:
        return "-"
    change = 100 * (1 - ours / best)
    return f"{change:.1f}% lower" if change >= 0 else f"{-change:.1f}% higher"


# (label, metric key, higher is better, formatter of ours vs the best baseline) of the gain bullets
GAINS = [("goodput", "goodput_req_s", True, lambda o, b: f"{o / b:.2f}x" if b > 0 else "-"),
         ("TTFT attainment", "ttft_attainment", True, lambda o, b: f"{100 * (o - b):+.1f} pp"),
         ("P95 TTFT", "p95_ttft_s", False, _reduction),
         ("TPOT attainment", "tpot_attainment", True, lambda o, b: f"{100 * (o - b):+.1f} pp"),
         ("TBT attainment", "tbt_attainment", True, lambda o, b: f"{100 * (o - b):+.1f} pp"),
         ("P95 TBT", "p95_tbt_s", False, _reduction),
         ("throughput", "throughput_tok_s", True, lambda o, b: f"{o / b:.2f}x" if b > 0 else "-")]


# ---------------------------------------------------------------- plots

def _styles(grid: _Grid) -> dict[str, dict]:
    """One colour per policy across all plots; the reference policy drawn thicker."""
    cmap = plt.get_cmap("tab10")
    return {p: {"color": cmap(i % 10), "lw": 2.6 if p.startswith(REFERENCE) else 1.5, "label": p}
            for i, p in enumerate(grid.policies)}


def _plot_attainment(grid: _Grid):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    drawn = False
    for ax, (name, key) in zip(axes, (("TTFT", "ttft_attainment"), ("TPOT", "tpot_attainment"),
                                      ("TBT", "tbt_attainment"))):
        drawn = _lines(ax, grid, key, 100.0, scale=grid.mid_scale) or drawn
        ax.set(title=f"{name} attainment (SLO scale {_g(grid.mid_scale)})", xlabel="arrival rate (req/s)",
               ylim=(-2, 102))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attainment (%)")
    return _finish(fig, axes[0], drawn)


def _plot_tbt_cdf(grid: _Grid):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for p, style in _styles(grid).items():
        run = grid.runs.get((p, grid.top_rate, grid.mid_scale)) or {}
        vals = sorted(v for v in map(finite, run.get("tbt_over_slo") or []) if v is not None and v > 0)
        if vals:
            ax.step(vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post", **style)
            drawn = True
    ax.axvline(1.0, color="black", ls="--", lw=1, label="SLO")
    ax.set_xscale("log")
    ax.set(title=f"TBT / SLO CDF at {_g(grid.top_rate)} req/s, SLO scale {_g(grid.mid_scale)}",
           xlabel="TBT / SLO (log)", ylabel="share of tokens", ylim=(0, 1.01))
    ax.grid(alpha=0.3, which="both")
    return _finish(fig, ax, drawn)


def _lines(ax, grid: _Grid, key: str, scale_by: float = 1.0, **where) -> bool:
    """One line per policy of metric `key` along the free axis; True if anything was drawn."""
    drawn = False
    for p, style in _styles(grid).items():
        xs, ys = grid.series(p, key, **where)
        if xs:
            ax.plot(xs, [scale_by * y for y in ys], marker="o", **style)
            drawn = True
    return drawn


def _plot_p95_vs_scale(grid: _Grid):
    if len(grid.scales) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = _lines(ax, grid, "p95_tbt_over_slo", rate=grid.top_rate)
    ax.axhline(1.0, color="black", ls="--", lw=1, label="SLO")
    ax.set(title=f"P95 TBT / SLO at {_g(grid.top_rate)} req/s", xlabel="SLO scale", ylabel="P95 TBT / SLO")
    ax.grid(alpha=0.3)
    return _finish(fig, ax, drawn)


def _plot_throughput(grid: _Grid):
    """Throughput beside goodput: tokens the server did, and requests that met every SLO."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = False
    for ax, key, title, unit in ((axes[0], "throughput_tok_s", "Throughput (input + output tokens)", "tokens / s"),
                                 (axes[1], "goodput_req_s", "Goodput (requests meeting TTFT, TPOT and TBT)",
                                  "requests / s")):
        drawn = _lines(ax, grid, key, scale=grid.mid_scale) or drawn
        ax.set(title=f"{title}, SLO scale {_g(grid.mid_scale)}", xlabel="arrival rate (req/s)", ylabel=unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    return _finish(fig, axes[0], drawn)


def _finish(fig, legend_ax, drawn: bool):
    """A figure with nothing to show is dropped rather than written as an empty frame."""
    if not drawn:
        plt.close(fig)
        return None
    legend_ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- values

def finite(x: Any) -> float | None:
    """A finite float, or None for None / NaN / inf / non-numbers."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def json_safe(x: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN / inf to None (json.dumps would write invalid NaN)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def fmt_metric(x: float | None, kind: str) -> str:
    if x is None:
        return "-"
    return {"pct": f"{100 * x:.1f}%", "ratio": f"{x:.2f}", "num": f"{x:,.0f}", "rate": f"{x:.3f}",
            "int": f"{x:.0f}", "s": f"{x:.3f} s" if x < 1 else f"{x:.2f} s" if x < 100 else f"{x:.0f} s"}[kind]


def fmt_value(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt_value(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _unique(xs: Iterable) -> list:
    return list(dict.fromkeys(xs))
