"""Paper-style comparison in the simulator: writes docs/results/<setup>/ and docs/results_tables.md.

    python bench/sim_results.py              # all setups, seed 0, every core (hours on 2 cores)
    python bench/sim_results.py --quick      # 30 requests, two rates: a smoke run
    python bench/sim_results.py --setups 8b-a100-longbench,8b-a100-pressure --scales 1.5 \
        --rate-index 0,3 --seeds 0,1,2 --requests 30 --policies orbitflow,orbitflow+fcfs,no-offload,no-offload+slo \
        --out runs/admission      # the admission ablation: means over seeds in seeds.md

Setups follow the paper's evaluation: Llama-3.1-8B on one A100-80GB and Llama-3-70B at TP-4 on
H100-SXM, ShareGPT-like and LongBench-like traces (lognormal arrivals, CV 1), SLO scales 1, 1.5 and
2.5 of the no-offload decode step at full KV, and a device KV capacity capped well below the
traces' peak demand (as the paper caps it) so that placement matters. `8b-a100-pressure` is the
Pause-Resume family: outputs of 2K-4K tokens (many plan windows long) from 256-1K-token prompts,
bursty arrivals (gamma, CV 3) and 1 GiB of device KV, so batches admitted when they fit outgrow it.
A policy named `policy+admission` (`flexgen-plus+slo`, `orbitflow+fcfs`) runs with that admission
instead of its own (`orbitflow_ray.planner.admission`).

Runs go to worker processes (`--jobs`, default every core; runs are deterministic, so the results do
not depend on it) and each finished run is kept in `--cache` (default runs/sim-cache), keyed by a
hash of the package's source: a sweep stopped part way resumes where it was, and any code change
re-runs everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from orbitflow_ray.planner import split_policy
from orbitflow_ray.sim.compare import RunCache, code_version, run_grid
from orbitflow_ray.metrics.report import write_report
from orbitflow_ray.sim.simulator import SimConfig
from orbitflow_ray.sim.workload import WorkloadConfig, generate

BASELINES = ["all-offload", "static-uniform", "flexgen-plus", "select-n", "no-offload"]
POLICIES = (["orbitflow"] + BASELINES + [f"{b}+slo" for b in BASELINES]
            + ["orbitflow+fcfs", "orbitflow-uniform", "orbitflow-no-deposit", "orbitflow-no-pause",
               "orbitflow-window-admit", "orbitflow-edf-link", "orbitflow-no-hold", "orbitflow-ties-join",
               "orbitflow-no-bank-wait", "orbitflow-fifo-queue"])
SCALES = [1.0, 1.5, 2.5]
GiB = 1 << 30
SETUPS = {
    "8b-a100-sharegpt": (SimConfig.build(model="llama-3.1-8b", gpu="a100-80gb", device_kv_bytes=4 * GiB),
                         dict(length="sharegpt"), [1.0, 2.0, 4.0, 8.0]),
    "8b-a100-longbench": (SimConfig.build(model="llama-3.1-8b", gpu="a100-80gb", device_kv_bytes=8 * GiB),
                          dict(length="longbench", max_input_tokens=32_000), [0.1, 0.2, 0.4, 0.8]),
    "70b-tp4-h100-sharegpt": (SimConfig.build(model="llama-3-70b", gpu="h100-80gb-sxm", tensor_parallel_size=4, device_kv_bytes=2 * GiB),
                              dict(length="sharegpt", max_input_tokens=6_000), [1.0, 2.0, 4.0, 8.0]),
    "70b-tp4-h100-longbench": (SimConfig.build(model="llama-3-70b", gpu="h100-80gb-sxm", tensor_parallel_size=4, device_kv_bytes=2 * GiB),
                               dict(length="longbench", max_input_tokens=7_500), [0.25, 0.5, 1.0, 2.0]),
    "8b-a100-pressure": (SimConfig.build(model="llama-3.1-8b", gpu="a100-80gb", device_kv_bytes=1 * GiB),
                         dict(length="pressure", arrival="gamma", cv=3.0), [0.025, 0.05, 0.1, 0.2]),
}
SEED_METRICS = (("goodput_req_s", "goodput req/s", "{:.4f}"), ("ttft_attainment", "TTFT att.", "{:.0%}"),
                ("p95_ttft_s", "P95 TTFT s", "{:.1f}"), ("tpot_attainment", "TPOT att.", "{:.0%}"),
                ("tbt_attainment", "TBT att.", "{:.0%}"), ("total_pauses", "pauses", "{:.1f}"))


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 requests, two rates, one scale")
    ap.add_argument("--requests", type=int, default=100, help="requests per trace (default: 100)")
    ap.add_argument("--setups", default=",".join(SETUPS), help="comma-separated setups")
    ap.add_argument("--out", default="docs/results", help="output folder (default: docs/results)")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="comma-separated policies, each optionally +fcfs or +slo (default: the full grid)")
    ap.add_argument("--scales", type=_floats, default=None, help="SLO scales (default: 1,1.5,2.5)")
    ap.add_argument("--rate-index", default=None,
                    help="comma-separated indices into each setup's rates, e.g. 0,3 (default: all)")
    ap.add_argument("--seeds", default="0",
                    help="comma-separated trace seeds; the first seed's runs make each setup's report, "
                         "seeds.md holds the means over all (default: 0)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="worker processes (default: every core)")
    ap.add_argument("--cache", default="runs/sim-cache",
                    help="folder of finished runs, keyed by the code's hash ('' for none; default: runs/sim-cache)")
    ap.add_argument("--merge", default=None,
                    help="comma-separated output folders of earlier runs (e.g. one per setup, made by the same "
                         "code): write the combined tables of their summary.json files to --out, run nothing")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    cache = RunCache(args.cache) if args.cache else None
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        split_policy(p)
    if args.merge:
        doc = merge_summaries([Path(d) for d in args.merge.split(",") if d])
        write_tables(doc, policies, Path(args.out))
        return 0
    seeds = [int(x) for x in args.seeds.split(",") if x]
    summary = []
    for name in args.setups.split(","):
        base, wl, rates = SETUPS[name]
        n, scales = (30, SCALES[1:2]) if args.quick else (args.requests, args.scales or SCALES)
        rates = rates[1:3] if args.quick else rates
        if args.rate_index:
            rates = [rates[int(i)] for i in args.rate_index.split(",")]
        for seed in seeds:
            trace = generate(WorkloadConfig(rate_per_s=rates[0], num_requests=n, seed=seed, **wl))
            t0 = time.perf_counter()
            runs = run_grid(base, trace, rates[0], policies, rates, scales, jobs=args.jobs, cache=cache)
            context = {"setup": name, "sim_config": base.to_dict(), "workload": wl, "requests": n,
                       "seed": seed, "simulated_in_s": round(time.perf_counter() - t0, 1), "jobs": args.jobs,
                       "code_version": cache.version if cache else code_version()}
            if seed == seeds[0]:
                write_report(runs, Path(args.out) / name, title=f"{name}: policies side by side", context=context)
            summary.append((name, seed, runs))
            print(f"{name} seed {seed}: {len(runs)} runs in {context['simulated_in_s']} s", file=sys.stderr)
    version = cache.version if cache else code_version()
    doc = [{"setup": n, "seed": seed, "code_version": version,
            "runs": [{k: r[k] for k in ("policy", "rate", "slo_scale", "metrics")} for r in runs]}
           for n, seed, runs in summary]
    Path(args.out, "summary.json").write_text(json.dumps(doc, default=str))
    write_tables(doc, policies, Path(args.out))
    return 0


def merge_summaries(folders: list[Path]) -> list[dict]:
    """The summary.json entries of `folders` (each an earlier run's --out), in order. A long grid can
    so run a setup or two at a time. Raises ValueError when they were made by different code
    (`code_version`) or hold the same (setup, seed) twice."""
    doc = [e for f in folders for e in json.loads((f / "summary.json").read_text())]
    versions = {e.get("code_version") for e in doc}
    if len(versions) != 1 or None in versions:
        raise ValueError(f"summaries made by different code (or unstamped): versions {sorted(map(str, versions))}")
    keys = [(e["setup"], e["seed"]) for e in doc]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a (setup, seed) appears twice in {[str(f) for f in folders]}")
    return doc


def write_tables(doc: list[dict], policies: list[str], out: Path) -> None:
    """tables.md (first seed of each setup), seeds.md, bar.md and headline.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    first = {}
    for e in doc:
        first.setdefault(e["setup"], e["seed"])
    (out / "tables.md").write_text(summary_tables([e for e in doc if e["seed"] == first[e["setup"]]], policies))
    (out / "seeds.md").write_text(seed_tables(doc, policies))
    (out / "bar.md").write_text(bar_tables(doc, policies))
    (out / "headline.md").write_text(headline_tables(doc, policies))


OFFLOADING = ("all-offload", "static-uniform", "flexgen-plus", "select-n")
BAR = 0.98  # issue 14: orbitflow's goodput at least 0.98x every other policy's, cell by cell


def _means(summary: list[dict]) -> dict[tuple, dict[str, dict[str, float]]]:
    """(setup, scale, rate) -> policy -> metric -> mean over the seeds that ran it (None dropped)."""
    acc: dict[tuple, dict[str, dict[str, list[float]]]] = {}
    for d in summary:
        for r in d["runs"]:
            cell = acc.setdefault((d["setup"], r["slo_scale"], r["rate"]), {}).setdefault(r["policy"], {})
            for k, v in r["metrics"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    cell.setdefault(k, []).append(float(v))
    return {c: {p: {k: sum(v) / len(v) for k, v in ms.items()} for p, ms in ps.items()} for c, ps in acc.items()}


def _met_counts(summary: list[dict]) -> dict[tuple, dict[str, str]]:
    """(setup, scale, rate) -> policy -> the requests meeting all their SLOs in each seed's run,
    e.g. "49/26/21" (seeds in order): how many requests a goodput ratio stands for."""
    acc: dict[tuple, dict[str, list[tuple[int, int]]]] = {}
    for d in summary:
        for r in d["runs"]:
            m = r["metrics"]
            acc.setdefault((d["setup"], r["slo_scale"], r["rate"]), {}).setdefault(r["policy"], []).append(
                (d["seed"], round(m["all_slo_attainment"] * m["num_requests"])))
    return {c: {p: "/".join(str(n) for _, n in sorted(v)) for p, v in ps.items()} for c, ps in acc.items()}


def headline_tables(summary: list[dict], policies: list[str]) -> str:
    """Markdown: per setup and SLO scale, every policy's goodput at each rate, then at the highest
    rate its TTFT attainment, P95 TTFT, TPOT and TBT attainment and pauses (means over the seeds)."""
    cells = _means(summary)
    seeds = sorted({d["seed"] for d in summary})
    lines = []
    for setup in dict.fromkeys(c[0] for c in cells):
        for scale in sorted({c[1] for c in cells if c[0] == setup}):
            rates = sorted({c[2] for c in cells if c[0] == setup and c[1] == scale})
            top = rates[-1]
            lines += [f"### {setup}, SLO scale {scale:g} (mean of seeds {seeds})", "",
                      "| policy | " + " | ".join(f"goodput @{r:g}" for r in rates)
                      + f" | TTFT att. @{top:g} | P95 TTFT @{top:g} | TPOT att. @{top:g} | TBT att. @{top:g}"
                      f" | pauses @{top:g} |", "|---" * (len(rates) + 6) + "|"]
            for policy in policies:
                ms = [cells.get((setup, scale, r), {}).get(policy) for r in rates]
                if all(m is None for m in ms):
                    continue
                g = ["-" if m is None else f"{m['goodput_req_s']:.4f}" for m in ms]
                t = ms[-1]
                tail = ["-"] * 5 if t is None else [
                    f"{t['ttft_attainment']:.0%}", f"{t['p95_ttft_s']:.1f} s", f"{t['tpot_attainment']:.0%}",
                    f"{t['tbt_attainment']:.0%}", f"{t.get('total_pauses', 0):.1f}"]
                lines.append(f"| `{policy}` | " + " | ".join(g + tail) + " |")
            lines.append("")
    return "\n".join(lines)


def bar_tables(summary: list[dict], policies: list[str], subject: str = "orbitflow") -> str:
    """Markdown: issue 14's bar, cell by cell (mean over seeds): `subject`'s goodput against the best
    of every other policy run (baselines with either admission, ablations), met when it is at least
    BAR x that; then its gains over the best offloading baseline beside the paper's headline."""
    cells = _means(summary)
    seeds = sorted({d["seed"] for d in summary})
    met_counts = _met_counts(summary)
    others = [p for p in policies if p != subject]
    lines = [f"## The bar: `{subject}` goodput >= {BAR:g}x the best other policy (mean of seeds {seeds})", "",
             "| setup | SLO scale | rate req/s | " + f"`{subject}` | best other | its goodput | ratio | met | "
             "TTFT / TPOT / TBT-request att., ours vs its | requests meeting all SLOs per seed, ours vs its |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    met = total = 0
    for (setup, scale, rate), ps in sorted(cells.items()):
        if subject not in ps or not any(p in ps for p in others):
            continue
        mine = ps[subject]["goodput_req_s"]
        best = max((p for p in others if p in ps), key=lambda p: ps[p]["goodput_req_s"])
        theirs = ps[best]["goodput_req_s"]
        ok = mine >= BAR * theirs
        met, total = met + ok, total + 1
        ratio = f"{mine / theirs:.2f}x" if theirs > 0 else "-"
        att = " / ".join(f"{ps[subject].get(k, float('nan')):.0%} vs {ps[best].get(k, float('nan')):.0%}"
                         for k in ("ttft_attainment", "tpot_attainment", "tbt_request_attainment"))
        lines.append(f"| {setup} | {scale:g} | {rate:g} | {mine:.4f} | `{best}` | {theirs:.4f} | {ratio} | "
                     f"{'yes' if ok else '**no**'} | {att} | "
                     f"{met_counts[setup, scale, rate][subject]} vs {met_counts[setup, scale, rate][best]} |")
    lines += ["", f"Met in {met} of {total} cells.", "", gain_tables(cells, policies, subject)]
    return "\n".join(lines) + "\n"


def _gains(me: dict, them: dict) -> tuple[float, float, float, float]:
    """`me` against `them` (one cell's means): TPOT and TBT attainment gains in points, the P95 TBT
    change in % (negative: ours lower) and the throughput ratio."""
    p95 = 100 * (me["p95_tbt_s"] / them["p95_tbt_s"] - 1) if them["p95_tbt_s"] > 0 else 0.0
    thr = me["throughput_tok_s"] / them["throughput_tok_s"] if them["throughput_tok_s"] > 0 else 1.0
    return (100 * (me["tpot_attainment"] - them["tpot_attainment"]),
            100 * (me["tbt_attainment"] - them["tbt_attainment"]), p95, thr)


def gain_tables(cells: dict, policies: list[str], subject: str = "orbitflow") -> str:
    """Markdown: `subject`'s gains over the offloading baselines beside the paper's headline, per setup
    over its cells (max and median; for P95 TBT the min, the best change). Two comparisons: each
    baseline with its native admission (admit while it fits, as the paper's baselines run), and per
    cell the offloading baseline with the most goodput under either admission (the strongest one)."""
    lines = [f"## `{subject}` against the offloading baselines, per setup over its cells", "",
             "Paper (OrbitFlow, its testbed): TPOT attainment up to +66 %, TBT up to +48 %, P95 latency -38 %,",
             "up to 3.3x throughput against existing offloading methods. Here: TPOT / TBT attainment gains in",
             "points (max / median over the setup's cells), P95 TBT change (min / median; negative = ours",
             "lower), throughput ratio (max / median).", "",
             "| setup | against | TPOT att. gain | TBT att. gain | P95 TBT change | throughput ratio |",
             "|---|---|---|---|---|---|"]
    offl = [p for p in policies if p.split("+")[0] in OFFLOADING]
    native = [p for p in offl if "+" not in p]
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    for setup in dict.fromkeys(c[0] for c in cells):
        mine = {k: ps for k, ps in cells.items() if k[0] == setup and subject in ps}
        rows = [(f"`{b}`", [_gains(ps[subject], ps[b]) for ps in mine.values() if b in ps]) for b in native]
        best = [_gains(ps[subject], ps[max((p for p in offl if p in ps), key=lambda p: ps[p]["goodput_req_s"])])
                for ps in mine.values() if any(p in ps for p in offl)]
        rows.append(("best by goodput (either admission)", best))
        for name, g in rows:
            if not g:
                continue
            tpot, tbt, p95, thr = zip(*g)
            lines.append(f"| {setup} | {name} | {max(tpot):+.1f} / {med(tpot):+.1f} | {max(tbt):+.1f} / "
                         f"{med(tbt):+.1f} | {min(p95):+.0f} % / {med(p95):+.0f} % | "
                         f"{max(thr):.2f}x / {med(thr):.2f}x |")
    return "\n".join(lines) + "\n"


def seed_tables(summary: list[dict], policies: list[str]) -> str:
    """Markdown: per setup, SLO scale and rate, every policy's mean over the seeds (goodput, TTFT
    attainment, P95 TTFT, TPOT and TBT attainment, pauses)."""
    lines = []
    for setup in dict.fromkeys(d["setup"] for d in summary):
        entries = [d for d in summary if d["setup"] == setup]
        runs = [r for d in entries for r in d["runs"]]
        seeds = [d["seed"] for d in entries]
        for scale in sorted({r["slo_scale"] for r in runs}):
            for rate in sorted({r["rate"] for r in runs}):
                lines += [f"### {setup}, SLO scale {scale:g}, {rate:g} req/s (mean of seeds {seeds})", "",
                          "| policy | " + " | ".join(h for _, h, _ in SEED_METRICS) + " |",
                          "|---" * (len(SEED_METRICS) + 1) + "|"]
                for policy in policies:
                    ms = [r["metrics"] for r in runs if r["policy"] == policy and r["rate"] == rate
                          and r["slo_scale"] == scale]
                    cells = []
                    for key, _, fmt in SEED_METRICS:
                        vals = [m[key] for m in ms if m.get(key) is not None]
                        cells.append(fmt.format(sum(vals) / len(vals)) if vals and len(vals) == len(ms) else "-")
                    lines.append(f"| `{policy}` | " + " | ".join(cells) + " |")
                lines.append("")
    return "\n".join(lines)


def summary_tables(summary: list[dict], policies: list[str] = POLICIES) -> str:
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
            for policy in policies:
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


if __name__ == "__main__":
    sys.exit(main())
