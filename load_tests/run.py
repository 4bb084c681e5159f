"""One load test from parsed options: the trace, its prompts, the app (started or given), one run
per KV policy, the simulator's prediction, and the report. `load_tests/cli.py` builds the options."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from load_tests.app import (AppSpec, ManagedApp, fetch_state, kv_summary, load_serve_config, served_model,
                           with_policy)
from load_tests.client import ClientConfig, RequestResult, run_trace
from load_tests.prompts import PromptBuilder, load_prompt_tokenizer
from load_tests.report import headline, write_load_report
from orbitflow_ray.metrics import summarize
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.sim.workload import TraceRequest, WorkloadConfig, generate, load_trace, resolve_lengths

DEFAULT_TPOT_SLO_S = 0.25  # the engine's default, for judging requests to a server we know nothing of
DEFAULT_TTFT_SLO_S = 10.0  # likewise the app's default_ttft_slo_s: TTFT is judged whatever the server
STATE_SETTLE_S = 1.2  # > the workers' default telemetry period (0.5 s): the final KV counters get reported


def _context_len(model: str | None) -> int | None:
    if not model:
        return None
    try:
        from orbitflow_ray.model.loader import load_spec

        return load_spec(model).max_position_embeddings
    except Exception:  # a model this machine does not have: no cap on the trace's lengths
        return None


def make_trace(o: argparse.Namespace, context_len: int | None) -> tuple[list[TraceRequest], dict]:
    """The trace and how it was made. Arrivals within warm-up + duration (or num_requests in all)."""
    if o.num_requests is not None and o.duration is not None:
        raise SystemExit("set --duration or --num-requests, not both")
    if o.trace:
        trace = [replace(r, tpot_slo_s=r.tpot_slo_s or o.tpot_slo, ttft_slo_s=r.ttft_slo_s or o.ttft_slo)
                 for r in load_trace(o.trace)]
        if o.num_requests is not None:
            trace = trace[:o.num_requests]
        elif o.duration is not None:
            trace = [r for r in trace if r.arrival_s < o.warmup + o.duration]
        return trace, {"trace": str(o.trace)}
    lengths = {k: getattr(o, k) for k in ("input_tokens", "output_tokens", "min_input_tokens",
                                          "max_input_tokens", "min_output_tokens", "max_output_tokens")}
    if lengths["max_input_tokens"] is None and context_len:
        # Keep prompt + output inside the model's context, or every long request is a 400 (only
        # for length kinds with a max_input_tokens; fixed lengths are the user's to choose).
        try:
            out_cap = resolve_lengths(o.workload, **{**lengths, "max_input_tokens": 1}).max_output_tokens
            lengths["max_input_tokens"] = max(1, context_len - (out_cap or 0))
        except ValueError:
            pass
    duration = None if o.num_requests is not None else o.warmup + (o.duration or 60.0)
    cfg = WorkloadConfig(arrival=o.arrival, rate_per_s=o.rate, cv=o.cv, num_requests=o.num_requests,
                         duration_s=duration, length=o.workload, seed=o.seed, tpot_slo_s=o.tpot_slo,
                         ttft_slo_s=o.ttft_slo, **lengths)
    return generate(cfg), cfg.to_dict()


def _trace_rate(trace: list[TraceRequest], workload: dict) -> float:
    if "rate_per_s" in workload:
        return float(workload["rate_per_s"])
    span = trace[-1].arrival_s if trace else 0.0
    return (len(trace) - 1) / span if span > 0 else 0.0


def _client_stats(results: list[RequestResult]) -> dict:
    waits = [r.client_wait_s for r in results if r.client_wait_s is not None]
    return {"p50_client_wait_s": float(np.percentile(waits, 50)) if waits else None,
            "p95_client_wait_s": float(np.percentile(waits, 95)) if waits else None,
            "max_client_wait_s": max(waits) if waits else None,
            "token_count_mismatches": sum(r.count_mismatch for r in results)}


def measure(label: str, url: str, trace: list[TraceRequest], prompts: list[str], client: ClientConfig,
            slos: tuple[float, float | None], progress: bool, settle_s: float = STATE_SETTLE_S) -> dict:
    """One run against `url`: the run entry of the report (metrics, server KV, per-request data)."""
    before = fetch_state(url)
    started = time.perf_counter()
    results = asyncio.run(run_trace(trace, prompts, client, progress, desc=label))
    wall = time.perf_counter() - started
    if before is not None:
        time.sleep(settle_s)
    kv = kv_summary(before, fetch_state(url) if before is not None else None)
    measured = [r for r in results if not r.warmup]
    records = [r.record(*slos) for r in measured]
    metrics = summarize(records)
    all_tokens = sum(len(r.token_times) for r in results)
    metrics.update(_client_stats(measured), num_warmup=len(results) - len(measured), run_wall_s=wall,
                   total_pauses=kv["num_pauses"] if kv else None,  # the client cannot see pauses
                   link_bytes=kv["link_bytes"] if kv else None,
                   link_bytes_per_output_token=kv["link_bytes"] / all_tokens if kv and all_tokens else None,
                   peak_device_kv_bytes=kv["device_kv_bytes_used_peak"] if kv else None)
    errors = Counter(r.error for r in results if r.error)
    return {"policy": label, "metrics": metrics, "server_kv": kv, "errors": dict(errors.most_common(10)),
            "_results": results, "_records": records}


def _predict(run: dict, trace, app_args: AppArgs, policy: str | None, o) -> None:
    from load_tests.predict import predict

    args = AppArgs.model_validate(with_policy(app_args.model_dump(), policy))
    warm = frozenset(r.request_id for r in trace if r.arrival_s < o.warmup)
    pred = predict(trace, args, o.sim_gpu, warm)
    run["predicted"] = pred.metrics
    run["_predicted_records"] = pred.records


def _resolve(o: argparse.Namespace) -> tuple[AppSpec | None, AppArgs | None]:
    if o.policies and o.url:
        raise SystemExit("--policies redeploys the app, so it needs the harness to manage it (--config, no --url)")
    config = o.config or (None if o.url else "deployments/config.yaml")
    spec = load_serve_config(config) if config else None
    return spec, spec.app_args if spec else None


def run_load_test(o: argparse.Namespace) -> dict[str, Path]:
    spec, app_args = _resolve(o)
    if o.compare_sim and app_args is None:
        raise SystemExit("--compare-sim needs the app's engine settings: pass --config (with --url too if "
                         "the app is already running)")
    model = o.model or (app_args.name if app_args else None) or served_model(o.url)
    if not model:
        raise SystemExit(f"--model is required: {o.url} lists no models")
    tokenizer = load_prompt_tokenizer(o.tokenizer or (app_args.model if app_args else model))
    trace, workload = make_trace(o, _context_len(app_args.model if app_args else o.tokenizer or model))
    if not trace:
        raise SystemExit("the trace is empty: raise --rate, --duration or --num-requests")
    builder = PromptBuilder(tokenizer, o.seed)
    prompts = [builder.build(i, r.input_tokens) for i, r in enumerate(trace)]
    engine = app_args.engine_config() if app_args else None
    slos = (o.tpot_slo or (engine.tpot_slo_s if engine else DEFAULT_TPOT_SLO_S),
            o.ttft_slo or (app_args.default_ttft_slo_s if app_args else DEFAULT_TTFT_SLO_S))
    api_key = o.api_key or os.environ.get("OPENAI_API_KEY")
    policies = o.policies or [None]
    runs = []
    with contextlib.ExitStack() as stack:
        app = stack.enter_context(ManagedApp(spec, o.port)) if not o.url else None
        for policy in policies:
            if app is not None:
                print(f"deploying {spec.name} from {spec.path} (kv_policy {policy or 'as configured'})...",
                      file=sys.stderr)
                t0 = time.perf_counter()
                app.deploy(policy)
                print(f"ready at {app.url} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            url = app.url if app is not None else o.url
            label = policy or (engine.kv_policy if engine else model)
            client = ClientConfig(url, model, api_key, o.endpoint, o.max_concurrency, o.timeout,
                                  not o.no_slo_field, o.warmup)
            settle = max(STATE_SETTLE_S, 2.5 * app_args.telemetry_period_s) if app_args else STATE_SETTLE_S
            run = measure(label, url, trace, prompts, client, slos, not o.no_progress, settle)
            run["rate"], run["slo_scale"] = _trace_rate(trace, workload), None
            if o.compare_sim:
                _predict(run, trace, app_args, policy, o)
            runs.append(run)
        if app is not None:
            print("shutting the app down...", file=sys.stderr)
    context = {"endpoint": url,
               "managed": f"started from {spec.path}" if app is not None else "no (an endpoint already up)",
               "model": model, "api": o.endpoint, "requests": len(trace),
               "warm-up": f"{o.warmup:g} s ({sum(r.arrival_s < o.warmup for r in trace)} requests, not reported)",
               "max concurrency": o.max_concurrency or "unlimited", "workload": workload,
               "prompts": "exact token counts (model tokenizer)" if builder.exact else "approximate lengths",
               "SLOs for requests without one": f"TPOT {slos[0]:g} s, TTFT {slos[1]:g} s",
               "simulator": f"GPU spec {o.sim_gpu}" if o.compare_sim else "not run (--compare-sim)"}
    for r in runs:
        if r.get("server_kv"):
            context[f"server KV ({r['policy']})"] = _kv_line(r["server_kv"])
    paths = write_load_report(runs, o.out, context=context)
    print(headline(runs, paths))
    return paths


def _kv_line(kv: dict) -> str:
    mib = lambda key: f"{kv.get(key, 0) / 2**20:,.1f} MiB"  # noqa: E731
    return (f"moved H2D {mib('bytes_h2d')}, D2H {mib('bytes_d2h')}; peak device KV {mib('device_kv_bytes_used_peak')} "
            f"of {mib('device_kv_bytes_capacity')}, peak host KV {mib('host_kv_bytes_used_peak')}; "
            f"pauses {kv.get('num_pauses', 0)}, preemptions {kv.get('num_preemptions', 0)}")
