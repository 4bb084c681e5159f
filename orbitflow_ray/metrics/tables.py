"""The report tables the simulator and the load tests share: policies side by side per SLO scale
and rate, OrbitFlow's gains over the best baseline, and the formatting of metric values.

    from orbitflow_ray.metrics.tables import comparison_markdown
    lines = comparison_markdown(runs)   # runs: [{"policy", "rate", "slo_scale", "metrics"}, ...]

Missing or None metrics are skipped (a "-" in tables), so a partial grid still reports.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

REFERENCE = "orbitflow"  # the policy compared against the best baseline
# (column header, metric key, formatter name) of each per-rate column in the markdown tables: goodput
# (requests meeting TTFT, TPOT and TBT SLOs per second) first, then each SLO's attainment and tail.
COLUMNS = [("goodput req/s", "goodput_req_s", "rate"), ("TTFT att.", "ttft_attainment", "pct"),
           ("P95 TTFT", "p95_ttft_s", "s"), ("TPOT att.", "tpot_attainment", "pct"),
           ("TBT att.", "tbt_attainment", "pct"), ("P95 TBT/SLO", "p95_tbt_over_slo", "ratio"),
           ("throughput tok/s", "throughput_tok_s", "num"), ("pauses", "total_pauses", "int"),
           ("failed", "num_failed", "int")]


class Grid:
    """The runs indexed by (policy, rate, slo_scale), with the axes in a stable order."""

    def __init__(self, runs: list[dict]):
        self.policies = unique(r["policy"] for r in runs)
        self.rates = sorted(unique(r["rate"] for r in runs))
        self.scales = sorted(unique(r["slo_scale"] for r in runs))
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


def comparison_markdown(runs: list[dict], heading: str = "Policies") -> list[str]:
    """The policy tables and OrbitFlow's gains over the best baseline, as markdown lines. Runs
    without an SLO scale (slo_scale None: measured with absolute SLOs) get one table under `heading`."""
    return _comparison(Grid(runs), heading)


LEGEND = ("*goodput*: requests per second meeting all three SLOs (TTFT; TPOT; TBT: the request's P99 gap "
          "within the SLO); *att.*: share of requests (TTFT, TPOT) or of tokens (TBT) meeting the SLO.")


def _comparison(grid: Grid, heading: str = "Policies") -> list[str]:
    lines = [LEGEND, ""] if grid.runs else []
    for scale in grid.scales:
        lines += [f"## SLO scale {scale:g}" if scale is not None else f"## {heading}", "", *_table(grid, scale), ""]
    if REFERENCE in grid.policies:
        lines += ["## OrbitFlow vs best baseline", ""]
        for scale in grid.scales:
            lines += ([f"SLO scale {scale:g}:", ""] if scale is not None else []) + [*_gains(grid, scale), ""]
    return lines


def _table(grid: Grid, scale: float) -> list[str]:
    head = ["policy"] + [f"{name} @{rate:g}/s" for rate in grid.rates for name, _, _ in COLUMNS]
    rows = [[f"`{p}`"] + [fmt_metric(grid.metric(p, rate, scale, key), kind) for rate in grid.rates
                          for _, key, kind in COLUMNS] for p in grid.policies]
    return ["| " + " | ".join(r) + " |" for r in [head, ["---"] + ["---:"] * (len(head) - 1), *rows]]


def _gains(grid: Grid, scale: float) -> list[str]:
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


def _best(grid: Grid, policies: list[str], rate: float, scale: float, key: str,
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


def fmt_g(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def unique(xs: Iterable) -> list:
    """xs without repeats, in first-seen order."""
    return list(dict.fromkeys(xs))
