"""Token-Deposit against its ablation in the simulator: `orbitflow` vs `orbitflow-no-deposit`.

    python bench/deposit_ab.py                                  # 8b-a100-sharegpt, 3 seeds, 2 rates
    python bench/deposit_ab.py --setup 8b-a100-longbench --rates 0.2,0.8 --requests 60

One setup of `bench/sim_results.py` (its SimConfig and trace family), SLO scale 1.5 by default,
each seed its own trace, both policies on the same trace. Prints one row per (rate, seed, policy):
TPOT attainment, TBT attainment (tokens), goodput (requests meeting TTFT, TPOT and TBT per s) and
p95 TTFT, then per rate the mean over seeds and the number of seeds where the deposit is worse than
no-deposit on TPOT or TBT attainment. `--json PATH` writes every row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_results import SETUPS  # noqa: E402

from orbitflow_ray.sim.simulator import simulate  # noqa: E402
from orbitflow_ray.sim.workload import WorkloadConfig, generate, scale_rate  # noqa: E402

POLICIES = ("orbitflow", "orbitflow-no-deposit")
KEYS = ("tpot_attainment", "tbt_attainment", "goodput_req_s", "p95_ttft_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", default="8b-a100-sharegpt", choices=sorted(SETUPS))
    ap.add_argument("--rates", default=None, help="comma-separated req/s (default: the setup's 2nd and 4th)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--slo-scale", type=float, default=1.5)
    ap.add_argument("--requests", type=int, default=80, help="requests per trace (default 80, as docs/results.md)")
    ap.add_argument("--json", default=None, help="write every row here")
    args = ap.parse_args()
    base, wl, setup_rates = SETUPS[args.setup]
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [setup_rates[1], setup_rates[3]]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        trace = generate(WorkloadConfig(rate_per_s=rates[0], num_requests=args.requests, seed=seed, **wl))
        for rate in rates:
            for policy in POLICIES:
                cfg = base.replace(kv_policy=policy, slo_scale=args.slo_scale, seed=seed)
                m = simulate(cfg, scale_rate(trace, rate / rates[0])).metrics
                rows.append({"rate": rate, "seed": seed, "policy": policy, **{k: m[k] for k in KEYS}})
                print(_fmt(rows[-1]), flush=True)
    print(f"\n{args.setup}, SLO scale {args.slo_scale}, {args.requests} requests, seeds {args.seeds}: mean over seeds")
    for rate in rates:
        for policy in POLICIES:
            sel = [r for r in rows if r["rate"] == rate and r["policy"] == policy]
            print(_fmt({"rate": rate, "seed": "mean", "policy": policy,
                        **{k: float(np.mean([r[k] for r in sel])) for k in KEYS}}))
        for key in ("tpot_attainment", "tbt_attainment"):
            worse = sum(_get(rows, rate, s, POLICIES[0], key) < _get(rows, rate, s, POLICIES[1], key) - 1e-12
                        for s in {r["seed"] for r in rows})
            print(f"  rate {rate}: deposit worse than no-deposit on {key} in {worse} of {len(args.seeds.split(','))} seeds")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _get(rows: list[dict], rate: float, seed: int, policy: str, key: str) -> float:
    return next(r[key] for r in rows if r["rate"] == rate and r["seed"] == seed and r["policy"] == policy)


def _fmt(r: dict) -> str:
    return (f"rate {r['rate']:>5} seed {r['seed']!s:>4} {r['policy']:<21} TPOT {r['tpot_attainment']:.3f} "
            f"TBT {r['tbt_attainment']:.4f} goodput {r['goodput_req_s']:.3f} req/s p95 TTFT {r['p95_ttft_s']:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
