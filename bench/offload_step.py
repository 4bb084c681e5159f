"""One batch's decode step offloaded against the same batch on device, in the real engine, and what
the plan predicted for it: how far the cost model's price of offloading is from this machine's.

Two greedy requests (random token ids, --prompt-lens): the first decodes --solo-steps tokens alone,
then the other joins (`admission="fcfs"`, so no admission can keep them apart); once both decode,
--steps steps are timed. Once as `--policy`
(orbitflow by default) with --device-kv-bytes (config.yaml's 48 MiB: the two prompts do not both
fit, so layers go to host over the emulated link), once as `no-offload` with every layer on device.
--rounds alternates the two, one engine per run, in this process (each run builds its engine anew).

    .venv/bin/python bench/offload_step.py                   # config.yaml's engine, 880 + 850 tokens
    .venv/bin/python bench/offload_step.py --json runs/offload_step.json
    .venv/bin/python bench/offload_step.py --prompt-lens 64,64 --device-kv-bytes 6000000 --steps 3 --rounds 1  # smoke

Prints, per run, the median step (ms), the plan's predicted step at the last timed step (and in the
plan made at the join, before the cost model has seen an offloaded step of this batch), host
layers per request, bytes copied in and the stall per step; then the medians over the rounds and
two ratios: offloaded / on device (what offloading costs here) and predicted / measured for the
offloaded run (below 1: the plan prices the step too low). Numbers move with the machine; on a
shared one, `others_cores` says how many cores other processes used meanwhile.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "kernels"), str(REPO / "bench")]

from _noise import others_cores_since, others_snapshot  # noqa: E402
from orbitflow_ray.config import EngineConfig  # noqa: E402
from orbitflow_ray.engine import LLMEngine  # noqa: E402
from orbitflow_ray.model.loader import load_spec  # noqa: E402
from orbitflow_ray.model.tp import kv_bytes_per_token_per_layer  # noqa: E402
from orbitflow_ray.sampling_params import SamplingParams  # noqa: E402


def run_once(policy: str, device_kv_bytes: int, args: argparse.Namespace) -> dict:
    """Build an engine, bring both requests to decoding, time --steps steps."""
    config = EngineConfig(model=args.model, kv_policy=policy, admission="fcfs", backend="cpu",
                          device_kv_bytes=device_kv_bytes, host_kv_bytes=args.host_kv_bytes,
                          link_bandwidth_bytes_per_s=args.link_bandwidth, tpot_slo_s=args.tpot_slo)
    engine = LLMEngine(config)
    try:
        rng = random.Random(args.seed)
        vocab = engine.spec.vocab_size
        params = SamplingParams(max_tokens=args.steps + args.solo_steps + 32, temperature=0.0, ignore_eos=True)
        prompts = [[rng.randrange(100, vocab) for _ in range(n)] for n in args.prompt_lens]
        engine.add_request(prompts[0], params, "r0")  # alone first, as a load test's first arrival
        while not (engine.scheduler.running and len(engine.scheduler.running[0].output_token_ids) >= args.solo_steps):
            engine.step()
        for i, ids in enumerate(prompts[1:], 1):  # then the others join
            engine.add_request(ids, params, f"r{i}")
        results = []
        _execute = engine.runner.execute

        def execute(out):
            res = _execute(out)
            results.append(res)
            return res

        engine.runner.execute = execute
        running = engine.scheduler.running
        while not (len(running) == len(args.prompt_lens) and all(len(r.output_token_ids) >= 2 for r in running)):
            if not engine.has_unfinished_requests():
                raise RuntimeError("the requests finished before both decoded: raise --steps")
            engine.step()
        joined = getattr(engine.policy, "plan", None)  # the plan in force as both decode: made at the join
        predicted_at_join = joined.predicted_step_s * 1e3 if joined is not None else None
        walls, first = [], len(results)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t0)
        timed = results[first:]
        if any(len(r.sampled) != len(args.prompt_lens) for r in timed):
            raise RuntimeError("a timed step did not decode every request (one finished or was preempted)")
        plan = getattr(engine.policy, "plan", None)
        host = ({rid: len(layers) for rid, layers in plan.host_layers.items()} if plan is not None else
                {f"r{i}": 0 for i in range(len(args.prompt_lens))})
        return {"policy": policy, "step_ms": statistics.median(walls) * 1e3,
                "predicted_step_ms": plan.predicted_step_s * 1e3 if plan is not None else None,
                "predicted_at_join_ms": predicted_at_join,
                "host_layers": host,
                "h2d_mb_per_step": statistics.median(r.h2d_bytes for r in timed) / 1e6,
                "stall_ms_per_step": statistics.median(r.stall_s for r in timed) * 1e3}
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policy", default="orbitflow", help="the offloading policy (default orbitflow)")
    p.add_argument("--prompt-lens", type=lambda s: [int(x) for x in s.split(",")], default=[880, 850])
    p.add_argument("--device-kv-bytes", type=int, default=50331648, help="the offloaded run's (config.yaml's)")
    p.add_argument("--host-kv-bytes", type=int, default=1 << 30)
    p.add_argument("--link-bandwidth", type=float, default=2e9, help="emulated link, bytes/s (config.yaml's)")
    p.add_argument("--tpot-slo", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--solo-steps", type=int, default=20,
                   help="tokens the first request decodes alone before the others join (default 20)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (config.yaml's torch_threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    if len(args.prompt_lens) < 2 or args.steps < 1 or args.rounds < 1:
        p.error("need two or more --prompt-lens, --steps >= 1 and --rounds >= 1")
    torch.set_num_threads(args.threads)
    spec = load_spec(args.model)  # on device: every layer of the batch at its longest, twice over
    tokens = sum(args.prompt_lens) + len(args.prompt_lens) * (args.steps + 16)
    on_device_bytes = 2 * tokens * spec.num_layers * kv_bytes_per_token_per_layer(spec, 1, 4) + (16 << 20)
    snap = others_snapshot()
    runs = []
    for r in range(args.rounds):
        for policy, dev in ((args.policy, args.device_kv_bytes), ("no-offload", on_device_bytes)):
            row = run_once(policy, dev, args)
            runs.append(row)
            print(f"round {r} {policy:>12}: step {row['step_ms']:7.1f} ms  predicted "
                  f"{row['predicted_step_ms'] or float('nan'):7.1f} ms (at the join "
                  f"{row['predicted_at_join_ms'] or float('nan'):.1f})  host layers {row['host_layers']}  "
                  f"copied in {row['h2d_mb_per_step']:.1f} MB/step  stall {row['stall_ms_per_step']:.1f} ms",
                  flush=True)
    off = [x for x in runs if x["policy"] == args.policy]
    dev = [x for x in runs if x["policy"] == "no-offload"]
    if not any(sum(x["host_layers"].values()) for x in off):
        print(f"warning: {args.policy} kept every layer on device; lower --device-kv-bytes", file=sys.stderr)
    offloaded = statistics.median(x["step_ms"] for x in off)
    on_device = statistics.median(x["step_ms"] for x in dev)
    predicted = statistics.median(x["predicted_step_ms"] for x in off if x["predicted_step_ms"] is not None)
    at_join = statistics.median(x["predicted_at_join_ms"] / x["step_ms"] for x in off
                                if x["predicted_at_join_ms"] is not None)
    summary = {"offloaded_step_ms": offloaded, "on_device_step_ms": on_device,
               "offloaded_over_on_device": offloaded / on_device, "predicted_step_ms": predicted,
               "predicted_over_measured": predicted / offloaded, "at_join_over_measured": at_join, "prompt_lens": args.prompt_lens,
               "threads": args.threads, "others_cores": others_cores_since(snap), "runs": runs}
    print(f"offloaded {offloaded:.1f} ms / on device {on_device:.1f} ms = {summary['offloaded_over_on_device']:.2f}x; "
          f"plan predicted {predicted:.1f} ms = {summary['predicted_over_measured']:.2f}x the measured, "
          f"at the join {at_join:.2f}x "
          f"(medians of {args.rounds} rounds; other processes used {summary['others_cores']:.2f} cores)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
