"""The load test's PNGs: TTFT/TPOT/TBT CDFs, SLO attainment, latency and throughput over time.

One colour per policy (the simulator report's); measured lines solid, simulated dashed. Times are
seconds from the start of the run, the trace's clock. A figure with nothing to show is not written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orbitflow_ray.metrics import RequestRecord
from orbitflow_ray.metrics.plots import DPI, plt

SIM_STYLE = {"ls": "--", "alpha": 0.8}


def write_plots(runs: list[dict], out: Path) -> dict[str, Path]:
    paths = {}
    colors = {r["policy"]: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(runs)}
    for name, plot in (("ttft_cdf.png", lambda: _cdf(runs, colors, "TTFT", _ttfts, "ttft_slo_s")),
                       ("tpot_cdf.png", lambda: _cdf(runs, colors, "TPOT", _tpots, "tpot_slo_s")),
                       ("tbt_cdf.png", lambda: _cdf(runs, colors, "TBT", _tbts, "tpot_slo_s")),
                       ("slo_attainment.png", lambda: _attainment(runs, colors)),
                       ("latency_over_time.png", lambda: _latency_over_time(runs, colors)),
                       ("throughput_over_time.png", lambda: _throughput_over_time(runs, colors))):
        fig = plot()
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=DPI)
            plt.close(fig)
            paths[name] = out / name
    return paths


def _sources(run: dict) -> list[tuple[str, list[RequestRecord], dict]]:
    """(label suffix, finished records, line style) of the measurement and the prediction."""
    out = [("", [r for r in run.get("_records", []) if r.finished], {})]
    if run.get("_predicted_records"):
        out.append((" (sim)", [r for r in run["_predicted_records"] if r.finished], SIM_STYLE))
    return out


def _ttfts(recs: list[RequestRecord]) -> list[float]:
    return [r.ttft_s for r in recs]


def _tpots(recs: list[RequestRecord]) -> list[float]:
    return [r.tpot_s for r in recs if r.tpot_s is not None]


def _tbts(recs: list[RequestRecord]) -> list[float]:
    return np.concatenate([r.tbts for r in recs]).tolist() if recs else []


def _cdf(runs: list[dict], colors: dict, name: str, values, slo_field: str):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn, slos = False, set()
    for run in runs:
        for suffix, recs, style in _sources(run):
            vals = np.sort(values(recs))
            slos |= {getattr(r, slo_field) for r in recs if getattr(r, slo_field) is not None}
            if len(vals):
                ax.step(vals, np.arange(1, len(vals) + 1) / len(vals), where="post", color=colors[run["policy"]],
                        label=run["policy"] + suffix, **style)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    finite = sorted(s for s in slos if np.isfinite(s))
    if len(finite) == 1:  # one SLO for every request: mark it
        ax.axvline(finite[0], color="black", lw=1, ls=":", label=f"SLO {finite[0]:g} s")
    ax.set(title=f"{name} CDF", xlabel=f"{name} (s)", ylabel="share of " + ("tokens" if name == "TBT" else "requests"),
           ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _attainment(runs: list[dict], colors: dict):
    kinds = [("TTFT", "ttft_attainment"), ("TPOT", "tpot_attainment"), ("TBT", "tbt_attainment")]
    bars = [(run["policy"] + suffix, m, hatch, colors[run["policy"]])
            for run in runs for suffix, m, hatch in (("", run["metrics"], None), (" (sim)", run.get("predicted"), "//"))
            if m]
    if not any(m.get(k) is not None for _, m, _, _ in bars for _, k in kinds):
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(bars) + 3), 4.5))
    width = 0.8 / len(bars)
    for i, (label, m, hatch, color) in enumerate(bars):
        xs = np.arange(len(kinds)) + (i - (len(bars) - 1) / 2) * width
        ys = [100 * (m.get(k) or 0.0) for _, k in kinds]
        ax.bar(xs, ys, width, label=label, color=color, hatch=hatch, alpha=0.6 if hatch else 0.9,
               edgecolor="black", lw=0.5)
    ax.set_xticks(range(len(kinds)), [k for k, _ in kinds])
    ax.set(title="SLO attainment", ylabel="attainment (%)", ylim=(0, 105))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig


def _latency_over_time(runs: list[dict], colors: dict):
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    drawn = False
    for run in runs:
        c = colors[run["policy"]]
        for suffix, recs, style in _sources(run):
            marker = {"marker": "o", "s": 18} if not style else {"marker": "^", "s": 18, "facecolors": "none"}
            kw = {"color": c} if not style else {"edgecolors": c}
            for ax, get in ((axes[0], lambda r: r.ttft_s), (axes[1], lambda r: r.tpot_s)):
                pts = [(r.arrival_s, get(r)) for r in recs if get(r) is not None]
                if pts:
                    ax.scatter(*zip(*pts), label=run["policy"] + suffix, **marker, **kw)
                    drawn = True
        failed = [r.arrival_s for r in run.get("_records", []) if not r.finished]
        if failed:
            axes[0].scatter(failed, [0] * len(failed), marker="x", color="red", label=f"{run['policy']} failed")
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(title="Per-request latency by arrival time", ylabel="TTFT (s)")
    axes[1].set(ylabel="TPOT (s)", xlabel="arrival time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _throughput_over_time(runs: list[dict], colors: dict):
    times = [t for run in runs for _, recs, _ in _sources(run) for r in recs for t in r.release_times]
    if not times:
        return None
    start = min(r.arrival_s for run in runs for _, recs, _ in _sources(run) for r in recs)
    span = max(times) - start
    width = max(1.0, span / 60)  # about 60 bins, never finer than a second
    edges = start + width * np.arange(int(np.ceil(span / width)) + 2)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run in runs:
        for suffix, recs, style in _sources(run):
            counts, _ = np.histogram([t for r in recs for t in r.release_times], edges)
            ax.step(edges[:-1], counts / width, where="post", color=colors[run["policy"]],
                    label=run["policy"] + suffix, **style)
    ax.set(title=f"Output throughput over time ({width:.3g} s bins, reported requests)", xlabel="time (s)",
           ylabel="output tokens / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
