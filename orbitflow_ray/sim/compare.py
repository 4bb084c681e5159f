"""Every policy on the same trace, side by side: a grid of (SLO scale, policy, admission, rate) runs.

Rates are a sweep on one trace (`scale_rate`), so every policy and rate sees the same requests. A
policy named `policy+admission` (e.g. `flexgen-plus+slo`, `orbitflow+fcfs`) runs with that admission
instead of the policy's own, and its runs are labelled so (`run_label`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from orbitflow_ray.metrics import tbt_over_slo
from orbitflow_ray.sim.simulator import SimConfig, SimResult, simulate
from orbitflow_ray.sim.workload import TraceRequest, scale_rate

def _p50_ttft_slo(result: SimResult) -> float | None:
    """The median TTFT SLO the run judged (each request's own; the default rule scales with its prompt)."""
    slos = [r.ttft_slo_s for r in result.records if r.ttft_slo_s is not None and np.isfinite(r.ttft_slo_s)]
    return float(np.median(slos)) if slos else None


def run_label(cfg: SimConfig) -> str:
    """The policy's name, with `+admission` when the config sets one (None: the policy's own)."""
    e = cfg.engine
    return e.kv_policy if e.admission is None else f"{e.kv_policy}+{e.admission}"


def run_entry(result: SimResult, rate: float, slo_scale: float) -> dict:
    return {"policy": run_label(result.config), "kv_policy": result.config.engine.kv_policy,
            "admission": result.config.engine.admission, "rate": rate, "slo_scale": slo_scale,
            "metrics": {**result.metrics, "tpot_slo_s": result.tpot_slo_s, "p50_ttft_slo_s": _p50_ttft_slo(result),
                        "sim_wall_s": result.sim_wall_s,
                        "solve_s_sync": result.policy_metrics.get("solve_s_sync")},
            "tbt_over_slo": tbt_over_slo(result.records)}


def split_policy(spec: str, admission: str | None = None) -> tuple[str, str | None]:
    """`policy` or `policy+admission` -> (policy, admission); without a suffix, `admission`."""
    name, plus, adm = spec.partition("+")
    if plus and not adm:
        raise ValueError(f"{spec!r}: name an admission after '+' (e.g. {name}+slo)")
    return name, adm or admission


def run_grid(base: SimConfig, trace: list[TraceRequest], base_rate: float, policies: Sequence[str],
             rates: Sequence[float], slo_scales: Sequence[float], progress: bool = True) -> list[dict]:
    """Every (SLO scale, policy, rate); a policy may be `policy+admission` (`split_policy`)."""
    runs = []
    grid = [(s, p, r) for s in slo_scales for p in policies for r in rates]
    for scale, spec, rate in tqdm(grid, desc="compare", disable=not progress):
        policy, admission = split_policy(spec, base.engine.admission)
        cfg = base.replace(kv_policy=policy, admission=admission, slo_scale=scale)
        result = simulate(cfg, scale_rate(trace, rate / base_rate))
        runs.append(run_entry(result, rate, scale))
    return runs
