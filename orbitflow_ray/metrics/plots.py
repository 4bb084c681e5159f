"""The report figures the simulator and the load tests share: SLO attainment, TBT / SLO CDF, P95
TBT / SLO over SLO scales, throughput and goodput, one colour per policy, drawn from a `tables.Grid`.

    from orbitflow_ray.metrics.plots import comparison_plots
    paths = comparison_plots(Grid(runs), out_dir)   # {file name: path}; empty figures are not written
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the simulation hosts
import matplotlib.pyplot as plt  # noqa: E402

from orbitflow_ray.metrics.tables import REFERENCE, Grid, finite, fmt_g  # noqa: E402

DPI = 120


def comparison_plots(grid: Grid, out: Path) -> dict[str, Path]:
    """Write each figure that has something to show into `out`; return {file name: path}."""
    paths = {}
    for name, plot in (("attainment_vs_rate.png", _plot_attainment), ("tbt_cdf.png", _plot_tbt_cdf),
                       ("p95_vs_slo_scale.png", _plot_p95_vs_scale), ("throughput_vs_rate.png", _plot_throughput)):
        fig = plot(grid)
        if fig is not None:
            fig.savefig(out / name, dpi=DPI)
            plt.close(fig)
            paths[name] = out / name
    return paths


def _styles(grid: Grid) -> dict[str, dict]:
    """One colour per policy across all plots; the reference policy drawn thicker."""
    cmap = plt.get_cmap("tab10")
    return {p: {"color": cmap(i % 10), "lw": 2.6 if p.startswith(REFERENCE) else 1.5, "label": p}
            for i, p in enumerate(grid.policies)}


def _plot_attainment(grid: Grid):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    drawn = False
    for ax, (name, key) in zip(axes, (("TTFT", "ttft_attainment"), ("TPOT", "tpot_attainment"),
                                      ("TBT", "tbt_attainment"))):
        drawn = _lines(ax, grid, key, 100.0, scale=grid.mid_scale) or drawn
        ax.set(title=f"{name} attainment (SLO scale {fmt_g(grid.mid_scale)})", xlabel="arrival rate (req/s)",
               ylim=(-2, 102))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attainment (%)")
    return _finish(fig, axes[0], drawn)


def _plot_tbt_cdf(grid: Grid):
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
    ax.set(title=f"TBT / SLO CDF at {fmt_g(grid.top_rate)} req/s, SLO scale {fmt_g(grid.mid_scale)}",
           xlabel="TBT / SLO (log)", ylabel="share of tokens", ylim=(0, 1.01))
    ax.grid(alpha=0.3, which="both")
    return _finish(fig, ax, drawn)


def _lines(ax, grid: Grid, key: str, scale_by: float = 1.0, **where) -> bool:
    """One line per policy of metric `key` along the free axis; True if anything was drawn."""
    drawn = False
    for p, style in _styles(grid).items():
        xs, ys = grid.series(p, key, **where)
        if xs:
            ax.plot(xs, [scale_by * y for y in ys], marker="o", **style)
            drawn = True
    return drawn


def _plot_p95_vs_scale(grid: Grid):
    if len(grid.scales) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = _lines(ax, grid, "p95_tbt_over_slo", rate=grid.top_rate)
    ax.axhline(1.0, color="black", ls="--", lw=1, label="SLO")
    ax.set(title=f"P95 TBT / SLO at {fmt_g(grid.top_rate)} req/s", xlabel="SLO scale", ylabel="P95 TBT / SLO")
    ax.grid(alpha=0.3)
    return _finish(fig, ax, drawn)


def _plot_throughput(grid: Grid):
    """Throughput beside goodput: tokens the server did, and requests that met every SLO."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = False
    for ax, key, title, unit in ((axes[0], "throughput_tok_s", "Throughput (input + output tokens)", "tokens / s"),
                                 (axes[1], "goodput_req_s", "Goodput (requests meeting TTFT, TPOT and TBT)",
                                  "requests / s")):
        drawn = _lines(ax, grid, key, scale=grid.mid_scale) or drawn
        ax.set(title=f"{title}, SLO scale {fmt_g(grid.mid_scale)}", xlabel="arrival rate (req/s)", ylabel=unit)
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
