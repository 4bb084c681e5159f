"""Tensor-parallel decode throughput, TP-N against TP-1, in one invocation.

    .venv/bin/python bench/tensor_parallel.py                         # SmolLM2, TP 3 vs TP 1
    .venv/bin/python bench/tensor_parallel.py --model tiny-llama --tp 2 --prompts 2 --output-len 8  # smoke

Both runs generate the same greedy workload (--prompts prompts of --prompt-len token ids, seed 0,
--output-len tokens each, EOS ignored) through `LLM(tensor_parallel_size=N)`, after a warm-up
generate, with --device-kv-bytes / N per shard so both have the same blocks to place. TP-1 runs on
--tp1-threads torch threads (1 by default, as each shard actor does). Printed: out tok/s of each,
their ratio, the all-reduces per step each shard issued (2 per layer), the simulator's count for the
same config, and the load average. On this 2-core CPU machine TP > 1 is slower, not faster: the
shards share the same two cores, each step adds one Ray call per shard and 2 gloo all-reduces per
layer, and the weights a step reads are no fewer in total. The point of TP on GPUs is memory
(a model larger than one GPU) and aggregate HBM bandwidth, which this machine cannot show.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import ray
import torch

from orbitflow_ray import SamplingParams
from orbitflow_ray.llm import LLM
from orbitflow_ray.model.loader import load_spec
from orbitflow_ray.model.tp import allreduces_per_step


def run(args, tp: int, prompts: list[list[int]]) -> dict:
    llm = LLM(model=args.model, tensor_parallel_size=tp, kv_policy="no-offload",
              device_kv_bytes=args.device_kv_bytes // tp)
    try:
        sp = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        wall = time.perf_counter() - t0
        reduces = llm.engine.runner.last_num_all_reduces if tp > 1 else 0
        return {"tp": tp, "out_tok_s": sum(len(o.token_ids) for o in outs) / wall, "wall_s": wall,
                "all_reduces_per_step": reduces, "tokens": [o.token_ids for o in outs]}
    finally:
        llm.engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--device-kv-bytes", type=int, default=256 << 20)
    ap.add_argument("--tp1-threads", type=int, default=1,
                    help="torch threads of the TP-1 engine (default 1, as each "
                         "shard actor has: Ray sets OMP_NUM_THREADS from its 1 CPU; 0: torch default)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args()
    if args.tp1_threads:
        torch.set_num_threads(args.tp1_threads)
    spec = load_spec(args.model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, spec.vocab_size, args.prompt_len).tolist() for _ in range(args.prompts)]
    ray.init(num_cpus=max(4, args.tp), include_dashboard=False)
    try:
        base, tp = run(args, 1, prompts), run(args, args.tp, prompts)
    finally:
        ray.shutdown()
    same = sum(a == b for a, b in zip(base["tokens"], tp["tokens"]))
    result = {"model": args.model, "tp": args.tp, "tp1_out_tok_s": round(base["out_tok_s"], 2),
              "tpn_out_tok_s": round(tp["out_tok_s"], 2), "ratio_tpn_over_tp1": round(tp["out_tok_s"] / base["out_tok_s"], 3),
              "all_reduces_per_step": tp["all_reduces_per_step"],
              "sim_all_reduces_per_step": allreduces_per_step(spec, args.tp),
              "identical_outputs": f"{same}/{len(prompts)}", "tp1_threads": torch.get_num_threads(),
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}: TP1 {result['tp1_out_tok_s']} out tok/s, TP{args.tp} {result['tpn_out_tok_s']} out tok/s, "
          f"ratio {result['ratio_tpn_over_tp1']} (TP1 on {result['tp1_threads']} torch threads; load average "
          f"{result['load_avg_1m']}: on a shared 2-core box the ratio is mostly noise, and TP > 1 is "
          "expected to be slower on an idle one)")
    print(f"all-reduces per step per shard: {result['all_reduces_per_step']} "
          f"(simulator: {result['sim_all_reduces_per_step']}); identical greedy outputs {result['identical_outputs']}")


if __name__ == "__main__":
    main()
