"""Where a simulated run's late steps come from: each step's wall time against the TPOT SLO, and
what else the step carried (a prefill chunk, tier moves, link stall), per policy on one trace.

    python bench/late_steps.py --setup 70b-tp4-h100-longbench --seed 0 --rate-index 2 --scale 1.5 \\
        --policies orbitflow,orbitflow-uniform

The setups, traces and rates are `bench/sim_results.py`'s (100 requests a trace), so a cell of its
grid can be taken apart step by step. Prints, per policy: goodput, TPOT attainment, the share of
requests within their TBT SLO, the late steps and how many of them moved KV between tiers, carried
a prefill chunk or stalled on the link, and the policy's counters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_results import SETUPS  # noqa: E402

from orbitflow_ray.planner import split_policy  # noqa: E402
from orbitflow_ray.sim.simulator import Simulator  # noqa: E402
from orbitflow_ray.sim.workload import WorkloadConfig, generate, scale_rate  # noqa: E402

COUNTERS = ("engine_", "trigger_", "plans_", "solves_sync", "pauses")


def late_steps(setup: str, seed: int, rate_index: int, scale: float, spec: str) -> dict:
    base, wl, rates = SETUPS[setup]
    trace = generate(WorkloadConfig(rate_per_s=rates[0], num_requests=100, seed=seed, **wl))
    policy, admission = split_policy(spec, base.engine.admission)
    sim = Simulator(base.replace(kv_policy=policy, admission=admission, slo_scale=scale))
    steps: list[tuple[float, int, int, float]] = []
    execute = sim.executor.execute

    def logged(out):
        r = execute(out)
        steps.append((r.wall_s, sum(len(op.src_blocks) for op in out.moves),
                      sum(1 for s in out.seqs if len(s.token_ids) > 1 or not s.sample), r.stall_s))
        return r

    sim.executor.execute = logged
    result = sim.run(scale_rate(trace, rates[rate_index] / rates[0]))
    wall, moved, prefill, stall = (np.array(c) for c in zip(*steps))
    late = wall > sim.tpot_slo_s
    m = result.metrics
    return {"goodput_req_s": m["goodput_req_s"], "tpot_attainment": m["tpot_attainment"],
            "tbt_request_attainment": m["tbt_request_attainment"], "tpot_slo_ms": sim.tpot_slo_s * 1e3,
            "steps": len(wall), "late_steps": int(late.sum()), "late_with_moves": int((late & (moved > 0)).sum()),
            "late_with_prefill": int((late & (prefill > 0)).sum()), "late_with_stall": int((late & (stall > 0)).sum()),
            "steps_with_moves": int((moved > 0).sum()), "blocks_moved": int(moved.sum()),
            "mean_stall_ms": float(stall.mean() * 1e3), "mean_step_ms": float(wall.mean() * 1e3),
            "p50_step_ms": float(np.median(wall) * 1e3),
            "counters": {k: v for k, v in sim.policy.metrics().items() if k.startswith(COUNTERS)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", default="70b-tp4-h100-longbench", choices=sorted(SETUPS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate-index", type=int, default=2, help="index into the setup's rates (default: 2)")
    ap.add_argument("--scale", type=float, default=1.5, help="SLO scale (default: 1.5)")
    ap.add_argument("--policies", default="orbitflow,orbitflow-uniform")
    args = ap.parse_args()
    for spec in args.policies.split(","):
        row = late_steps(args.setup, args.seed, args.rate_index, args.scale, spec)
        counters = row.pop("counters")
        print(spec, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        print("   ", counters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
