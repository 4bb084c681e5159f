"""`orbitflow simulate` and `orbitflow compare`: paper-scale policy evaluation without a GPU.

    orbitflow simulate --model llama-3.1-8b --gpu a100-80gb --policy orbitflow \\
        --workload sharegpt --rate 2.0 --duration 600 --slo-scale 1.5 --out runs/x
    orbitflow compare --model llama-3.1-8b --gpu a100-80gb --workload longbench \\
        --policies orbitflow,all-offload,static-uniform,flexgen-plus,select-n,no-offload \\
        --rates 0.5,1,2,4 --slo-scales 1,1.5,2.5 --out runs/cmp
    orbitflow calibrate --out runs/calib   # fit the cost model to this machine, check fidelity
    orbitflow calibrate --out runs/calib --scale 0.4   # the same over shorter contexts, quicker
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orbitflow_ray.config import ADMISSIONS


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected positive seconds, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    from orbitflow_ray.cli import parse_bytes

    h = p.add_argument_group("hardware and model")
    h.add_argument("--model", default="llama-3.1-8b", help="model spec (see --list; default: llama-3.1-8b)")
    h.add_argument("--gpu", default="a100-80gb", help="GPU spec (see --list; default: a100-80gb)")
    h.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default: 1)")
    h.add_argument("--device-kv-bytes", type=parse_bytes, default=None,
                   help="device KV budget per GPU, e.g. 8GiB (default: what HBM has left after weights)")
    h.add_argument("--kv-capacity-fraction", type=float, default=1.0,
                   help="share of free HBM given to KV when --device-kv-bytes is unset (default: 1)")
    h.add_argument("--max-num-seqs", type=int, default=16, help="largest batch (default: 16)")
    h.add_argument("--solve-cost-s", type=float, default=0.005,
                   help="virtual seconds charged per planning solve that searches (default: 0.005; a batch "
                        "that fits on device whole is planned with no search, at no charge)")
    h.add_argument("--admission", choices=ADMISSIONS, default=None,
                   help="who joins the batch: fcfs (arrival order while the placement fits) or slo (also "
                        "only if no more TPOT/TBT SLOs are predicted to miss; a request whose TTFT SLO is lost "
                        "steps aside for those that can still meet theirs); default: each policy's own "
                        "(slo for orbitflow, fcfs for the others)")
    s = p.add_argument_group("SLOs (a trace's per-request tpot_slo_s / ttft_slo_s win over these)")
    s.add_argument("--tpot-slo", type=_seconds, default=None,
                   help="TPOT/TBT SLO in seconds for every request (default: the SLO scale x the no-offload "
                        "decode step at full device KV)")
    s.add_argument("--ttft-slo", type=_seconds, default=None,
                   help="TTFT SLO in seconds for every request; inf: not judged (default: the SLO scale x "
                        "(the request's prefill on an idle device + one no-offload decode step per prefill "
                        "chunk + one))")
    w = p.add_argument_group("workload")
    w.add_argument("--trace", help="a JSONL trace (arrival_s, input_tokens, output_tokens[, tpot_slo_s, ttft_slo_s]) "
                                   "instead of a generated workload")
    w.add_argument("--workload", default="sharegpt", help="sharegpt, longbench, fixed, uniform or pressure (default: sharegpt)")
    w.add_argument("--arrival", default="lognormal", help="poisson, gamma or lognormal (default: lognormal)")
    w.add_argument("--cv", type=float, default=1.0, help="arrival-gap coefficient of variation (default: 1)")
    w.add_argument("--num-requests", type=int, default=None, help="requests in the trace (default: 50)")
    w.add_argument("--duration", type=float, default=None, help="instead: arrivals within this many seconds")
    w.add_argument("--input-tokens", type=int, default=None, help="fixed: input length; sharegpt: its mean")
    w.add_argument("--output-tokens", type=int, default=None, help="fixed: output length; sharegpt: its mean")
    w.add_argument("--max-input-tokens", type=int, default=None, help="cap input lengths (fit the context)")
    w.add_argument("--seed", type=int, default=0, help="trace seed (default: 0)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="directory for report.json, report.md and plots")
    o.add_argument("--json", action="store_true", help="print report.json to stdout")
    o.add_argument("--list", action="store_true", help="list model and GPU specs and exit")


def _trace(args, rate: float):
    from orbitflow_ray.sim.workload import WorkloadConfig, generate, load_trace

    if args.trace:
        return load_trace(args.trace), None
    wl = WorkloadConfig(arrival=args.arrival, rate_per_s=rate, cv=args.cv, num_requests=args.num_requests,
                        duration_s=args.duration, length=args.workload, input_tokens=args.input_tokens,
                        output_tokens=args.output_tokens, max_input_tokens=args.max_input_tokens,
                        seed=args.seed)
    return generate(wl), wl.to_dict()


def _base_config(args, policy: str, slo_scale: float):
    from orbitflow_ray.sim.simulator import SimConfig

    return SimConfig.build(model=args.model, gpu=args.gpu, tensor_parallel_size=args.tp, kv_policy=policy,
                           admission=args.admission, device_kv_bytes=args.device_kv_bytes,
                           kv_capacity_fraction=args.kv_capacity_fraction, max_num_seqs=args.max_num_seqs,
                           slo_scale=slo_scale, solve_cost_s=args.solve_cost_s, tpot_slo_s=args.tpot_slo,
                           ttft_slo_s=args.ttft_slo)


def _list() -> int:
    from orbitflow_ray.sim.hardware import available_gpus, available_models

    print("models:", ", ".join(available_models()))
    print("gpus:  ", ", ".join(available_gpus()))
    return 0


def _emit(args, runs: list[dict], context: dict) -> None:
    from orbitflow_ray.metrics.report import write_report

    if args.out:
        written = write_report(runs, args.out, context=context)
        print(f"wrote {', '.join(str(p) for p in written.values())}", file=sys.stderr)
    if args.json:
        print(json.dumps({"runs": [{k: r[k] for k in ("policy", "rate", "slo_scale", "metrics")} for r in runs],
                          "context": context}, indent=1, default=str))


def _context(args, cfg, trace, workload) -> dict:
    return {"model": args.model, "gpu": args.gpu, "tp": args.tp, "requests": len(trace),
            "workload": workload or {"trace": args.trace}, "sim_config": cfg.to_dict()}


def cmd_simulate(args: argparse.Namespace) -> int:
    from orbitflow_ray.sim.compare import run_entry, run_label
    from orbitflow_ray.sim.simulator import simulate

    if args.list:
        return _list()
    trace, workload = _trace(args, args.rate)
    cfg = _base_config(args, args.policy, args.slo_scale)
    result = simulate(cfg, trace, progress=True)
    m = result.metrics
    print(f"{run_label(cfg)} on {cfg.engine.model}/{cfg.gpu} TP{cfg.engine.tensor_parallel_size}: {m['num_finished']}/{m['num_requests']} "
          f"finished, goodput {m['goodput_req_s'] or 0:.3f} req/s, TTFT att. {_pct(m['ttft_attainment'])} "
          f"(P95 TTFT {_s(m['p95_ttft_s'])}), TPOT att. {_pct(m['tpot_attainment'])}, TBT att. "
          f"{_pct(m['tbt_attainment'])}, P95 TBT {_ms(m['p95_tbt_s'])} (SLO {result.tpot_slo_s * 1e3:.1f} ms), "
          f"throughput {m['throughput_tok_s'] or 0:.0f} tok/s, pauses {m['total_pauses']}; simulated in "
          f"{result.sim_wall_s:.1f} s", file=sys.stderr)
    _emit(args, [run_entry(result, args.rate, args.slo_scale)], _context(args, cfg, trace, workload))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from orbitflow_ray.planner import split_policy
    from orbitflow_ray.sim.compare import run_grid

    if args.list:
        return _list()
    rates = args.rates
    trace, workload = _trace(args, rates[0])
    cfg = _base_config(args, split_policy(args.policies[0])[0], args.slo_scales[0])
    runs = run_grid(cfg, trace, rates[0], args.policies, rates, args.slo_scales)
    _emit(args, runs, _context(args, cfg, trace, workload))
    if not args.out and not args.json:
        for r in runs:
            m = r["metrics"]
            print(f"{r['policy']:26s} rate {r['rate']:<5g} scale {r['slo_scale']:<4g} goodput "
                  f"{m['goodput_req_s'] or 0:.3f} TTFT {_pct(m['ttft_attainment'])} P95 TTFT {_s(m['p95_ttft_s'])} "
                  f"TPOT {_pct(m['tpot_attainment'])} TBT {_pct(m['tbt_attainment'])} "
                  f"P95/SLO {m['p95_tbt_over_slo'] or 0:.2f}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from orbitflow_ray.sim.calibrate import REPLAY_MAX_TOKENS, REPLAY_PROMPT_LENS, calibrate, fidelity, scaled_lengths
    from orbitflow_ray.sim.hardware import save_gpu

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"measuring {args.model} on this machine (a few minutes at --scale 1)...", file=sys.stderr)
    gpu, fit = calibrate(args.model, args.base, args.scale)
    path = out / f"{gpu.name}.yaml"
    save_gpu(gpu, path)
    print(f"fit over {fit['samples']} steps: mean |error| {fit['mean_abs_rel_error']:.1%} a step, "
          f"max {fit['max_abs_rel_error']:.1%} (step-to-step jitter here {fit['step_jitter'] or 0:.1%}); "
          f"{fit['phase_mean_abs_rel_error']:.1%} over {fit['phases']} phases; wrote {path}", file=sys.stderr)
    report = {"gpu": str(path), "scale": args.scale, "fit": fit}
    if not args.skip_fidelity:
        lens = list(scaled_lengths(REPLAY_PROMPT_LENS, args.scale))
        for policy, extra in (("no-offload", {}), ("static-uniform", {"link_bandwidth_bytes_per_s": 1e9})):
            f = fidelity(args.model, gpu, lens, REPLAY_MAX_TOKENS, policy, **extra)
            report[f"fidelity_{policy}"] = f.to_dict()
            print(f"fidelity {policy}: mean step real {f.mean_step_real_s * 1e3:.0f} ms vs sim "
                  f"{f.mean_step_sim_s * 1e3:.0f} ms ({f.step_rel_error:.1%}); per-request TPOT error "
                  f"mean {f.mean_tpot_rel_error:.1%}, max {max(f.tpot_rel_errors):.1%}", file=sys.stderr)
    (out / "calibration.json").write_text(json.dumps(report, indent=1))
    return 0


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _s(x) -> str:
    return "-" if x is None else f"{x:.3g} s"


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f} ms"


def add_sim_commands(sub) -> None:
    s = sub.add_parser("simulate", help="simulate one policy at paper scale (no GPU needed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--policy", default="orbitflow", help="KV policy (default: orbitflow)")
    s.add_argument("--rate", type=float, default=1.0, help="arrival rate, requests/s (default: 1)")
    s.add_argument("--slo-scale", type=float, default=1.5,
                   help="TPOT/TBT SLO = scale x no-offload step at full KV; scales the default TTFT SLO "
                        "too (default: 1.5)")
    _common(s)
    s.set_defaults(func=cmd_simulate)
    c = sub.add_parser("compare", help="every policy on the same trace: report.json, report.md, plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--policies", type=_names,
                   default=_names("orbitflow,all-offload,static-uniform,flexgen-plus,select-n,no-offload"),
                   help="comma-separated policies, each optionally with +fcfs or +slo for that admission "
                        "instead of its own (default: orbitflow and the five baselines)")
    c.add_argument("--rates", type=_floats, default=[0.5, 1, 2, 4], help="arrival rates (default: 0.5,1,2,4)")
    c.add_argument("--slo-scales", type=_floats, default=[1.5],
                   help="SLO scales, of the TPOT/TBT and the default TTFT SLO (default: 1.5)")
    _common(c)
    c.set_defaults(func=cmd_compare)
    k = sub.add_parser("calibrate", help="fit the simulator's cost model to this machine and check it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--model", default="smollm2-135m", help="model to measure (default: smollm2-135m)")
    k.add_argument("--base", default="cpu-2core", help="spec whose peaks the factors scale (default: cpu-2core)")
    k.add_argument("--out", default="runs/calibration", help="output directory (default: runs/calibration)")
    k.add_argument("--scale", type=_scale, default=1.0,
                   help="shrink every probe context and replayed prompt by this factor, in (0, 1]: a "
                        "quicker, coarser calibration over shorter contexts (default: 1)")
    k.add_argument("--skip-fidelity", action="store_true", help="fit only, skip the replay check")
    k.set_defaults(func=cmd_calibrate)
