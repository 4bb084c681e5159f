"""SLO-feasibility routing against Serve's default router: one mixed long/short trace, two workers,
one report (goodput, p95 TTFT and the rest of the load-test table for each router).

    .venv/bin/python -m load_tests.routing --out reports/routing                 # ~5 min on 2 cores
    .venv/bin/python -m load_tests.routing --rate 0.8 --duration 60 --out reports/routing

The app is deployments/config.yaml with two worker replicas, deployed twice on one local Ray: with
`SLOFeasibilityRouter` (deployments/orbitflow_app/router.py: each request to the worker its
prompt would hurt least, from the central planner's probes) and with Serve's default
(`PowerOfTwoChoicesRequestRouter`: the less loaded of two random replicas). The trace is the same
for both: Poisson arrivals, each request short (`--short-tokens` in, 32 out) or, with probability
`--long-share`, long (`--long-tokens` in, 32 out). Same SLOs, same client (load_tests.client).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from load_tests.app import ManagedApp, load_serve_config
from load_tests.client import ClientConfig
from load_tests.prompts import PromptBuilder, load_prompt_tokenizer
from load_tests.report import headline, write_load_report
from load_tests.run import measure
from orbitflow_ray.sim.workload import TraceRequest

ROUTERS = {"slo-feasibility": "deployments.orbitflow_app.router:SLOFeasibilityRouter",
           "serve-default": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"}


def mixed_trace(rate: float, duration_s: float, long_share: float, short_tokens: int, long_tokens: int,
                seed: int) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= duration_s:
            return out
        n = long_tokens if rng.random() < long_share else short_tokens
        out.append(TraceRequest(f"req-{len(out)}", t, n, 32))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="deployments/config.yaml")
    ap.add_argument("--rate", type=float, default=0.6, help="arrivals per second")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    ap.add_argument("--long-share", type=float, default=0.3)
    ap.add_argument("--short-tokens", type=int, default=64)
    ap.add_argument("--long-tokens", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--routers", default=",".join(ROUTERS), help=f"subset of {list(ROUTERS)}")
    ap.add_argument("--out", default="reports/routing")
    o = ap.parse_args(argv)
    routers = [r for r in o.routers.split(",") if r]
    if not routers or any(r not in ROUTERS for r in routers):
        ap.error(f"--routers must name some of {list(ROUTERS)}")
    if o.rate <= 0 or o.duration <= 0 or not 0 <= o.long_share <= 1:
        ap.error("--rate and --duration must be positive, --long-share in [0, 1]")
    spec = load_serve_config(o.config)
    args = spec.app_args
    trace = mixed_trace(o.rate, o.duration, o.long_share, o.short_tokens, o.long_tokens, o.seed)
    builder = PromptBuilder(load_prompt_tokenizer(args.model), o.seed)
    prompts = [builder.build(i, r.input_tokens) for i, r in enumerate(trace)]
    engine = args.engine_config()
    slos = (engine.tpot_slo_s, args.default_ttft_slo_s)
    runs = []
    for router in routers:
        workers = {**spec.worker_options,
                   "autoscaling_config": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 16},
                   "request_router_config": {"request_router_class": ROUTERS[router],
                                             "request_routing_stats_period_s": 1.0}}
        run_spec = dataclasses.replace(spec, worker_options=workers, args={**spec.args, "torch_threads": 1})
        with ManagedApp(run_spec, port=0, ray_options={"num_cpus": 2}) as app:
            t0 = time.perf_counter()
            app.deploy()
            print(f"{router}: ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            client = ClientConfig(app.url, args.name, timeout_s=300.0)
            run = measure(router, app.url, trace, prompts, client, slos, progress=False)
            run["rate"], run["slo_scale"] = o.rate, None
            runs.append(run)
    context = {"config": o.config, "workers": 2, "model": args.model,
               "trace": f"Poisson {o.rate:g}/s for {o.duration:g} s, {len(trace)} requests, "
                        f"{o.long_share:.0%} long ({o.long_tokens} tokens in) / short ({o.short_tokens} in), 32 out",
               "SLOs": f"TPOT {slos[0]:g} s, TTFT {slos[1]:g} s", "routers": {r: ROUTERS[r] for r in routers}}
    paths = write_load_report(runs, o.out, title="Routing: SLO feasibility vs Serve's default", context=context)
    print(headline(runs, paths))


if __name__ == "__main__":
    main()
