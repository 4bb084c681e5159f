"""Paper-style comparison in the simulator: writes docs/results/<setup>/ and docs/results_tables.md.

    python bench/sim_results.py              # all setups (about 10-15 minutes on 2 cores)
    python bench/sim_results.py --quick      # 30 requests, two rates: a smoke run

Setups follow the paper's evaluation: Llama-3.1-8B on one A100-80GB and Llama-3-70B at TP-4 on
H100-SXM, ShareGPT-like and LongBench-like traces (lognormal arrivals, CV 1), SLO scales 1, 1.5 and
2.5 of the no-offload decode step at full KV, and a device KV capacity capped well below the
traces' peak demand (as the paper caps it) so that placement matters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from orbitflow_ray.sim.compare import run_grid
from orbitflow_ray.sim.report import write_report
from orbitflow_ray.sim.simulator import SimConfig
from orbitflow_ray.sim.workload import WorkloadConfig, generate

POLICIES = ["orbitflow", "all-offload", "static-uniform", "flexgen-plus", "select-n", "no-offload",
            "orbitflow-uniform", "orbitflow-no-deposit", "orbitflow-no-pause"]
SCALES = [1.0, 1.5, 2.5]
GiB = 1 << 30
SETUPS = {
    "8b-a100-sharegpt": (SimConfig(model="llama-3.1-8b", gpu="a100-80gb", device_kv_bytes=4 * GiB),
                         dict(length="sharegpt"), [1.0, 2.0, 4.0, 8.0]),
    "8b-a100-longbench": (SimConfig(model="llama-3.1-8b", gpu="a100-80gb", device_kv_bytes=8 * GiB),
                          dict(length="longbench", max_input_tokens=32_000), [0.1, 0.2, 0.4, 0.8]),
    "70b-tp4-h100-sharegpt": (SimConfig(model="llama-3-70b", gpu="h100-80gb-sxm", tp=4, device_kv_bytes=2 * GiB),
                              dict(length="sharegpt", max_input_tokens=6_000), [1.0, 2.0, 4.0, 8.0]),
    "70b-tp4-h100-longbench": (SimConfig(model="llama-3-70b", gpu="h100-80gb-sxm", tp=4, device_kv_bytes=2 * GiB),
                               dict(length="longbench", max_input_tokens=7_500), [0.25, 0.5, 1.0, 2.0]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 requests, two rates, one scale")
    ap.add_argument("--requests", type=int, default=100, help="requests per trace (default: 100)")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated setups")
    ap.add_argument("--out", default="docs/results", help="output folder (default: docs/results)")
    args = ap.parse_args()
    summary = []
    for name in args.setups.split(","):
        base, wl, rates = SETUPS[name]
        n, scales = (30, SCALES[1:2]) if args.quick else (args.requests, SCALES)
        rates = rates[1:3] if args.quick else rates
        trace = generate(WorkloadConfig(rate_per_s=rates[0], num_requests=n, seed=0, **wl))
        t0 = time.perf_counter()
        runs = run_grid(base, trace, rates[0], POLICIES, rates, scales)
        context = {"setup": name, "sim_config": dataclasses.asdict(base), "workload": wl, "requests": n,
                   "simulated_in_s": round(time.perf_counter() - t0, 1)}
        write_report(runs, Path(args.out) / name, title=f"{name}: policies side by side", context=context)
        summary.append((name, runs))
        print(f"{name}: {len(runs)} runs in {context['simulated_in_s']} s", file=sys.stderr)
    doc = [{"setup": n, "runs": [{k: r[k] for k in ("policy", "rate", "slo_scale", "metrics")} for r in runs]}
           for n, runs in summary]
    Path(args.out, "summary.json").write_text(json.dumps(doc, default=str))
    Path(args.out, "tables.md").write_text(summary_tables(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def summary_tables(summary: list[dict]) -> str:
    """Markdown: per setup and SLO scale, every policy at the lowest and highest rate."""
    lines = []
    for entry in summary:
        runs = entry["runs"]
        rates = sorted({r["rate"] for r in runs})
        lines += [f"### {entry['setup']}", ""]
        for scale in sorted({r["slo_scale"] for r in runs}):
            lines += [f"SLO scale {scale:g} (rates {rates[0]:g} and {rates[-1]:g} req/s):", "",
                      "| policy | TPOT att. | TBT att. | P95 TBT / SLO | throughput tok/s | pauses |",
                      "|---|---|---|---|---|---|"]
            for policy in POLICIES:
                cells = []
                for key, fmt in (("tpot_attainment", "{:.0%}"), ("tbt_attainment", "{:.0%}"),
                                 ("p95_tbt_over_slo", "{:.2f}"), ("throughput_tok_s", "{:,.0f}"),
                                 ("total_pauses", "{:d}")):
                    vals = []
                    for rate in (rates[0], rates[-1]):
                        m = next((r["metrics"] for r in runs if r["policy"] == policy and r["rate"] == rate
                                  and r["slo_scale"] == scale), {})
                        v = m.get(key)
                        vals.append("-" if v is None else fmt.format(v))
                    cells.append(" / ".join(vals))
                lines.append(f"| `{policy}` | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)
