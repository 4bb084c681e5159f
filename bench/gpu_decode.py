"""Decode step time of the engine under one KV policy: a full batch of long prompts, prefilled, then
timed decode steps split into the model runner and the host-side scheduler work around it. Writes
one JSON object to --out.

    PYTHONPATH=.:kernels python3 bench/gpu_decode.py --policy static-uniform --out runs/gpu/su.json
    PYTHONPATH=.:kernels python3 bench/gpu_decode.py --dry-run --policy no-offload --out /tmp/d.json

Defaults: Llama-3.1-8B's shapes with random bf16 weights (`random:llama-3.1-8b`), cuda backend,
8 requests x 2048 prompt tokens, 4 warm-up and 32 timed decode steps. --dry-run: `random:tiny-llama`,
cpu backend, float32, 2 x 64 tokens, 1 + 4 steps. Both tiers get room for every request's whole KV,
so the policy alone decides what goes to host. Per step: `step` is `engine.step()` wall time,
`execute` the model runner's part of it (KV moves, prefetch waits, forward, sampling: it ends on a
device sync), `host_overhead` the rest (schedule, cost-model feedback, update, outputs), `index`
the KV store's per-step block-id tensors (inside execute), `stall` the store's `last_stall_s`: time
compute waited on copies (CPU: the caller's clock while blocked; CUDA: events around the compute
stream's waits).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import torch

from orbitflow_ray import EngineConfig, SamplingParams
from orbitflow_ray.engine import LLMEngine
from orbitflow_ray.kv.tier_manager import cdiv
from orbitflow_ray.model.loader import load_spec

HBM_BYTES_PER_S = 4.3e12  # device copy rate measured on this workplace's H200 (read + write)


def _time_calls(obj, name: str, sink: dict) -> None:
    """Wrap obj.name so each call adds its wall seconds to sink[name] (bench-only instrumentation;
    a method the engine no longer has is left out and reads as 0)."""
    fn = getattr(obj, name, None)
    if fn is None:
        print(f"note: {type(obj).__name__}.{name} not found, not timed")
        return

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink[name] += time.perf_counter() - t0
    setattr(obj, name, timed)


def _stats(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": q[0], "p90": q[-1], "min": min(values)}


def build(args) -> tuple[LLMEngine, dict]:
    max_tokens = args.warmup + args.steps + 1  # the prefill samples the first
    spec = load_spec(args.model)
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    block_bytes = spec.kv_bytes_per_token_per_layer(itemsize) * 16
    blocks = args.requests * spec.num_layers * cdiv(args.context + max_tokens, 16)
    kv_bytes = (blocks + 4 * spec.num_layers) * block_bytes
    config = EngineConfig(model=args.model, kv_policy=args.policy, static_offload_fraction=args.offload_fraction,
                          backend=args.backend, dtype=args.dtype, device_kv_bytes=kv_bytes,
                          host_kv_bytes=kv_bytes, max_num_seqs=args.requests, max_num_batched_tokens=8192,
                          prefill_chunk_size=min(args.context, 2048),
                          max_model_len=args.context + max_tokens + 16)
    t0 = time.perf_counter()
    engine = LLMEngine(config)
    info = {"model": args.model, "policy": args.policy, "offload_fraction": args.offload_fraction,
            "backend": args.backend, "dtype": args.dtype, "requests": args.requests, "context": args.context,
            "kv_bytes_per_tier": kv_bytes, "build_s": time.perf_counter() - t0,
            "params": spec.num_params(), "kv_bytes_per_token": block_bytes // 16 * spec.num_layers}
    return engine, info


def run(engine: LLMEngine, args, info: dict) -> dict:
    gen = torch.Generator().manual_seed(1)
    vocab = engine.spec.vocab_size
    params = SamplingParams(max_tokens=args.warmup + args.steps + 1, ignore_eos=True)
    for _ in range(args.requests):
        engine.add_request(torch.randint(vocab, (args.context,), generator=gen).tolist(), params)
    sync = torch.cuda.synchronize if args.backend == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    prefill_steps, started = 0, set()
    while len(started) < args.requests:  # every request has its first token
        started |= {o.request_id for o in engine.step()}
        prefill_steps += 1
    sync()
    info["prefill_s"], info["prefill_steps"] = time.perf_counter() - t0, prefill_steps
    for _ in range(args.warmup):
        engine.step()
    spent: dict = collections.defaultdict(float)
    last: list = []
    sched, store = engine.scheduler, engine.runner.store
    schedule = sched.schedule

    def schedule_and_keep():
        out = schedule()
        last.append(out)
        return out
    sched.schedule = schedule_and_keep
    for obj, name in ((sched, "schedule"), (sched, "update_from_output"), (engine.runner, "execute"),
                      (store, "begin_step"), (store, "apply_moves")):
        _time_calls(obj, name, spent)
    rows, full = [], 0
    for _ in range(args.steps):
        before, stats0 = dict(spent), engine.kv_stats()
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        d = collections.defaultdict(float, {k: spent[k] - before.get(k, 0.0) for k in spent})
        stats1 = engine.kv_stats()
        out = last[-1]
        full += len(out.seqs) == args.requests and out.num_batched_tokens == args.requests
        rows.append({"step": wall, "execute": d["execute"], "host": wall - d["execute"],
                     "schedule": d["schedule"], "update": d["update_from_output"], "index": d["begin_step"],
                     "stall": getattr(store, "last_stall_s", 0.0), "h2d": stats1["bytes_h2d"] - stats0["bytes_h2d"],
                     "d2h": stats1["bytes_d2h"] - stats0["bytes_d2h"]})
    step_s = statistics.median(r["step"] for r in rows)
    ms = {k: _stats([1e3 * r[k] for r in rows]) for k in ("step", "execute", "host", "schedule", "index", "stall")}
    ctx_bytes = args.requests * (args.context + args.warmup) * info["kv_bytes_per_token"]
    weight_bytes = info["params"] * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    result = {**info, "steps": args.steps, "decode_steps_full": full,
              "step_ms": ms["step"], "execute_ms": ms["execute"], "host_overhead_ms": ms["host"],
              "schedule_ms": ms["schedule"], "store_index_ms": ms["index"], "stall_ms": ms["stall"],
              "tokens_per_s": args.requests / step_s,
              "h2d_bytes_per_step": statistics.median(r["h2d"] for r in rows),
              "d2h_bytes_per_step": statistics.median(r["d2h"] for r in rows),
              "hbm_floor_ms": 1e3 * (weight_bytes + ctx_bytes) / HBM_BYTES_PER_S}
    if args.backend == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--policy", default="no-offload")
    ap.add_argument("--offload-fraction", type=float, default=0.5, help="static-uniform's share on host")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the cpu backend, a few steps")
    ap.add_argument("--attention", choices=("batched", "per-seq"), default="batched",
                    help="decode attention: one paged call per layer, or gather + SDPA per seq (the old path)")
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    if args.dry_run:
        args.model, args.backend, args.dtype = "random:tiny-llama", "cpu", "float32"
        args.requests, args.context, args.warmup, args.steps = 2, 64, 1, 4
    engine, info = build(args)
    engine.runner.batched_decode = args.attention == "batched"
    info["attention"] = args.attention
    try:
        result = run(engine, args, info)
    finally:
        engine.close()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{args.policy} ({args.attention}): step {result['step_ms']['median']:.2f} ms, {result['tokens_per_s']:.0f} tok/s, "
          f"host {result['host_overhead_ms']['median']:.2f} ms, H2D {result['h2d_bytes_per_step'] / 1e6:.1f} MB/step")


if __name__ == "__main__":
    main()
