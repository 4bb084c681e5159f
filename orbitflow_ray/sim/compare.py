"""Every policy on the same trace, side by side: a grid of (SLO scale, policy, admission, rate) runs.

Rates are a sweep on one trace (`scale_rate`), so every policy and rate sees the same requests. A
policy named `policy+admission` (e.g. `flexgen-plus+slo`, `orbitflow+fcfs`) runs with that admission
instead of the policy's own, and its runs are labelled so (`run_label`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from orbitflow_ray.metrics import tbt_over_slo
from orbitflow_ray.planner import split_policy
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


def run_grid(base: SimConfig, trace: list[TraceRequest], base_rate: float, policies: Sequence[str],
             rates: Sequence[float], slo_scales: Sequence[float], progress: bool = True, jobs: int = 1,
             cache: RunCache | None = None) -> list[dict]:
    """Every (SLO scale, policy, rate), in that order; a policy may be `policy+admission` (`split_policy`).

    jobs: worker processes (forked); each run is deterministic, so the runs are the same whatever
    `jobs` is. cache: runs already made by the same code are read back instead of re-run.
    Raises ValueError when jobs < 1.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    tasks = [(base, trace, base_rate, spec, rate, scale)
             for scale in slo_scales for spec in policies for rate in rates]
    runs: list[dict | None] = [cache.get(*t) if cache else None for t in tasks]
    todo = [i for i, r in enumerate(runs) if r is None]
    bar = tqdm(total=len(todo), desc="compare", disable=not progress)
    if jobs == 1 or len(todo) <= 1:
        done = map(_run_one, (tasks[i] for i in todo))
        pool = None
    else:  # fork: the workers inherit the imported package (and numba's compiled kernels)
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork"))
        done = pool.map(_run_one, (tasks[i] for i in todo))
    try:
        for i, entry in zip(todo, done):
            runs[i] = entry
            if cache:
                cache.put(*tasks[i], entry)
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return runs  # type: ignore[return-value]


def _run_one(task: tuple) -> dict:
    base, trace, base_rate, spec, rate, scale = task
    policy, admission = split_policy(spec, base.engine.admission)
    cfg = base.replace(kv_policy=policy, admission=admission, slo_scale=scale)
    return run_entry(simulate(cfg, scale_rate(trace, rate / base_rate)), rate, scale)


def code_version() -> str:
    """A hash of the package's source files: runs made by other code are never mixed with these."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class RunCache:
    """Runs kept on disk, one JSON file each, keyed by everything that decides the run: the code
    version, the config, the trace, the policy, the rate and the SLO scale. A long sweep (docs/results)
    resumes where it was stopped, and re-runs everything once any source file changes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.version = code_version()
        self.hits = 0

    def _path(self, base: SimConfig, trace: list[TraceRequest], base_rate: float, spec: str, rate: float,
              scale: float) -> Path:
        key = json.dumps([self.version, base.to_dict(), [repr(t) for t in trace], base_rate, spec, rate, scale],
                         sort_keys=True, default=str)
        return self.root / self.version / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def get(self, *task) -> dict | None:
        path = self._path(*task)
        if not path.exists():
            return None
        self.hits += 1
        return json.loads(path.read_text())

    def put(self, *task_and_entry) -> None:
        *task, entry = task_and_entry
        path = self._path(*task)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, default=str))
        tmp.replace(path)  # atomic: a sweep killed mid-write leaves no half file
