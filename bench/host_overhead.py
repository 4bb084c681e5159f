"""Host work of one decode step, model math excluded: the real Scheduler, tier manager, KVStore,
ModelRunner and CPU transfer engine around a null model (no weights, K/V of zeros) whose attention
returns zeros without reading anything. What is left is the engine's own per-step work: planning,
block tables, KV writes, prefetch bookkeeping, sampling, update.

    .venv/bin/python bench/host_overhead.py --json                 # 16 x 32768 x 32 layers
    .venv/bin/python bench/host_overhead.py --baseline-ref a90807f  # and the same on an old commit
    .venv/bin/python bench/host_overhead.py --requests 4 --context 2048 --steps 4   # smoke

--json prints one line `{"host_ms_per_step": ..., "requests": 16, "context": 32768, "layers": 32}`
(median over --steps timed decode steps, after the prompts are prefilled and --warmup steps).
--baseline-ref runs this same script on a commit's `orbitflow_ray` and `kernels` (exported with
`git archive` to a temporary folder) right after, in a subprocess, and prints both and their ratio.
The issue's goal is <= 5 ms at 16 x 32K x 32 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if os.environ.get("HOST_OVERHEAD_SRC") is None:
    sys.path[:0] = [str(REPO), str(REPO / "kernels")]
else:  # a baseline checkout (--baseline-ref)
    src = os.environ["HOST_OVERHEAD_SRC"]
    sys.path[:0] = [src, os.path.join(src, "kernels")]

from orbitflow_kernels import make_transfer_engine  # noqa: E402
from orbitflow_ray.config import EngineConfig  # noqa: E402
from orbitflow_ray.costmodel import OnlineCostModel, default_prior  # noqa: E402
from orbitflow_ray.kv.store import KVStore  # noqa: E402
from orbitflow_ray.kv.tier_manager import KVTierManager, cdiv  # noqa: E402
from orbitflow_ray.model.runner import ModelRunner  # noqa: E402
from orbitflow_ray.model.spec import ModelSpec  # noqa: E402
from orbitflow_ray.planner import policy_from_config  # noqa: E402
from orbitflow_ray.request import Request  # noqa: E402
from orbitflow_ray.sampling_params import SamplingParams  # noqa: E402
from orbitflow_ray.sched.loop import StepLoop  # noqa: E402
from orbitflow_ray.sched.scheduler import Scheduler  # noqa: E402

BLOCK_SIZE = 16


class NullModel:
    """LlamaModel's hooks with no math: per layer `before_layer`, then `attend` on zero q/k/v."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.device = torch.device("cpu")

    def forward(self, input_ids, positions, attend, before_layer=None) -> torch.Tensor:
        s, n = self.spec, input_ids.shape[0]
        q = torch.zeros(n, s.num_heads, s.head_dim)
        kv = torch.zeros(n, s.num_kv_heads, s.head_dim)
        for layer in range(s.num_layers):
            if before_layer is not None:
                before_layer(layer)
            attend(layer, q, kv, kv)
        return torch.zeros(n, 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(hidden.shape[0], self.spec.vocab_size)


def _null_attention(runner: ModelRunner) -> None:
    """Attention that reads no KV and returns zeros, on whichever interface this tree has."""
    runner._sdpa = lambda q, keys, values, mask: torch.zeros(q.shape[0], q.shape[1] * q.shape[2])
    if hasattr(runner, "prefill_attention"):  # the CPU's prefill attention
        runner.prefill_attention = lambda q, keys, values, scale, out=None: torch.zeros_like(q) if out is None \
            else out.zero_()
    if hasattr(runner, "attention"):  # batched paged decode attention
        runner.attention = lambda q, pool, table, seq_lens, scale, rows=None: torch.zeros_like(q)
        return
    # The per-request interface: the store's gather is attention's read, so it goes too.
    runner.store.read = lambda layer, i, k, v: (k, v)
    runner._sdpa = lambda q, keys, values, mask: torch.zeros(q.shape[0], q.shape[1] * q.shape[2])


def _max_tokens(args) -> int:
    # Prompts are prefilled two per step and the ones done decode meanwhile: room for all of it.
    return args.requests + args.warmup + args.steps + 2


def build(args):
    spec = ModelSpec(name="null", vocab_size=64, hidden_size=1, intermediate_size=1, num_layers=args.layers,
                     num_heads=1, num_kv_heads=1, head_dim=1, rms_norm_eps=1e-5, rope_theta=1e4,
                     max_position_embeddings=args.context + _max_tokens(args) + 16,
                     tie_word_embeddings=True)
    block_bytes = spec.kv_bytes_per_token_per_layer(4) * BLOCK_SIZE
    per_req = cdiv(spec.max_position_embeddings, BLOCK_SIZE) * args.layers
    kv_bytes = (args.requests * per_req + args.layers) * block_bytes
    config = EngineConfig(model="null", kv_policy=args.policy, backend="cpu", device_kv_bytes=kv_bytes,
                          host_kv_bytes=kv_bytes, block_size=BLOCK_SIZE, max_num_seqs=args.requests,
                          max_num_batched_tokens=2 * args.context, prefill_chunk_size=args.context,
                          solve_ahead=False)
    blocks = kv_bytes // block_bytes
    cost = OnlineCostModel(default_prior(args.layers, None, "cpu"))
    policy = policy_from_config(config, args.layers, cost)
    kv = KVTierManager(args.layers, BLOCK_SIZE, block_bytes, blocks, blocks)
    sched = Scheduler(config, kv, policy, frozenset(), spec.max_position_embeddings)
    transfer = make_transfer_engine("cpu")
    store = KVStore(transfer, blocks, blocks, BLOCK_SIZE, 1, 1, torch.float32, config.prefetch_depth)
    runner = ModelRunner(NullModel(spec), store)
    _null_attention(runner)
    return sched, runner, cost, policy, transfer


def measure(args) -> dict:
    sched, runner, cost, policy, transfer = build(args)
    params = SamplingParams(max_tokens=_max_tokens(args), ignore_eos=True)
    for i in range(args.requests):
        sched.add_request(Request(f"r{i}", [1] * args.context, params))

    loop = StepLoop(sched, runner, cost, policy)  # the engine's step, over the null model

    def step():
        t0 = time.perf_counter()
        s = loop.step()
        return s.now - t0, s.out  # schedule + execute: the step ends before feedback and update

    while any(r.num_computed_tokens < args.context for r in sched.running) or sched.waiting:
        step()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        wall, out = step()
        if len(out.seqs) != args.requests or out.num_batched_tokens != args.requests:
            raise RuntimeError(f"step {out.step_id} is not a full decode step: {len(out.seqs)} seqs")
        times.append(wall)
    transfer.close()
    return {"host_ms_per_step": round(1e3 * statistics.median(times), 3), "requests": args.requests,
            "context": args.context, "layers": args.layers}


def _baseline(ref: str, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "orbitflow_ray", "kernels"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        env = {**os.environ, "HOST_OVERHEAD_SRC": tmp}
        res = subprocess.run([sys.executable, __file__, *argv, "--json"], env=env, check=True,
                             capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print only the one JSON line")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--policy", default="no-offload", help="static-uniform puts half the layers on host")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--baseline-ref", default=None, help="also run on this git commit and print the ratio")
    args = ap.parse_args()
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return
    print(f"this tree: {result['host_ms_per_step']:.2f} ms/step ({args.requests} x {args.context} x "
          f"{args.layers} layers, {args.policy})")
    if args.baseline_ref:
        argv = [a for a in sys.argv[1:] if a not in ("--json",)]
        i = argv.index("--baseline-ref")
        base = _baseline(args.baseline_ref, argv[:i] + argv[i + 2:])
        print(f"{args.baseline_ref}: {base['host_ms_per_step']:.2f} ms/step; "
              f"this tree / baseline = {result['host_ms_per_step'] / base['host_ms_per_step']:.3f}")


if __name__ == "__main__":
    main()
