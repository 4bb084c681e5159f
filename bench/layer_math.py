"""The fused elementwise kernels (orbitflow_kernels/numba_elementwise.py) against the torch ops they
replace, in one process, interleaved (each repeat runs both, in alternating order), on SmolLM2-135M's
shapes: per op, then whole forward steps of the model with `fuse_elementwise` on and off.

    .venv/bin/python bench/layer_math.py                      # ops at 16 / 1,024 / 2,048 rows, then steps
    .venv/bin/python bench/layer_math.py --only ops --rows 16,1024 --repeats 500
    .venv/bin/python bench/layer_math.py --only steps --prompt-len 1000 --decode-batch 16 --context 1000

Steps: a prefill of one --prompt-len prompt (causal SDPA, the same in both paths, then the LM head
on its last row), and a decode step of --decode-batch sequences over --context cached tokens each
(paged decode attention on a pool of random K/V, then the LM head on every row); KV writes and
sampling are left out (the same in both paths). Prints, per row, min and median milliseconds of
each path and the median of the per-repeat ratios torch / fused (> 1: the kernels are faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "kernels")]

from orbitflow_kernels.attention import paged_decode_attention  # noqa: E402
from orbitflow_ray.model.llama import LlamaModel, rms_norm, swiglu  # noqa: E402
from orbitflow_ray.model.loader import load_model  # noqa: E402
from orbitflow_ray.model.rope import RotaryEmbedding  # noqa: E402


def interleaved(old: Callable[[], object], new: Callable[[], object], repeats: int) -> tuple[list, list]:
    """Seconds of each call, old and new alternating which goes first."""
    old(), new()  # compile / warm up
    t_old, t_new = [], []
    for i in range(repeats):
        for f, out in ((old, t_old), (new, t_new)) if i % 2 else ((new, t_new), (old, t_old)):
            t = time.perf_counter()
            f()
            out.append(time.perf_counter() - t)
    return t_old, t_new


def report(name: str, t_old: list, t_new: list, unit: float, label: str) -> None:
    ratio = statistics.median(a / b for a, b in zip(t_old, t_new))
    print(f"{name:28s} torch {min(t_old) * unit:9.3f} min {statistics.median(t_old) * unit:9.3f} med | "
          f"fused {min(t_new) * unit:9.3f} min {statistics.median(t_new) * unit:9.3f} med {label} | "
          f"torch/fused: min {min(t_old) / min(t_new):.2f}x, median of ratios {ratio:.2f}x", flush=True)


def bench_ops(spec, rows: list[int], repeats: int) -> None:
    h, hkv, d, hidden, inter = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.intermediate_size
    rope = RotaryEmbedding(spec)
    for n in rows:
        gen = torch.Generator().manual_seed(n)
        x, w = torch.randn(n, hidden, generator=gen), torch.rand(hidden, generator=gen) + 0.5
        q, k, _ = torch.randn(n, (h + 2 * hkv) * d, generator=gen).split((h * d, hkv * d, hkv * d), dim=-1)
        q, k = q.view(n, h, d), k.view(n, hkv, d)
        cos, sin = rope.cos_sin(torch.arange(n) + 500)
        gate_up = torch.randn(n, 2 * inter, generator=gen) * 3
        ops = {"rms_norm": lambda fused: rms_norm(x, w, spec.rms_norm_eps, fused),
               "rope (q and k)": lambda fused: rope.apply_cos_sin(q, k, cos, sin, fused=fused),
               "silu(gate) * up": lambda fused: swiglu(gate_up, inter, fused)}
        reps = repeats if n <= 64 else max(repeats // 10, 20)
        for name, op in ops.items():
            t_old, t_new = interleaved(lambda: op(False), lambda: op(True), reps)
            report(f"{name}, {n} rows", t_old, t_new, 1e6, "us")


def bench_steps(model: LlamaModel, prompt_len: int, batch: int, context: int, repeats: int) -> None:
    spec = model.spec
    gen = torch.Generator().manual_seed(0)
    scale = spec.head_dim ** -0.5

    def prefill_attend(_, q, k, v):
        qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1).reshape(q.shape[0], -1)

    bs = 16
    blocks = -(-(context + 1) // bs)
    pool = torch.randn(batch * blocks, 2, spec.num_kv_heads, bs, spec.head_dim, generator=gen)
    table = torch.arange(batch * blocks).view(batch, blocks)
    lens = torch.full((batch,), context + 1)

    def decode_attend(_, q, k, v):
        return paged_decode_attention(q, pool, table, lens, scale).flatten(1)

    ids = torch.randint(spec.vocab_size, (prompt_len,), generator=gen)
    steps = {f"prefill {prompt_len} tokens": (ids, torch.arange(prompt_len), prefill_attend, slice(-1, None)),
             f"decode {batch} x {context}": (ids[:batch], torch.full((batch,), context), decode_attend, slice(None))}
    for name, (tok, pos, attend, last) in steps.items():
        def step(fused: bool, tok=tok, pos=pos, attend=attend, last=last) -> None:
            model.fuse_elementwise = fused
            model.logits(model.forward(tok, pos, attend)[last])
        t_old, t_new = interleaved(lambda: step(False), lambda: step(True), repeats)
        report(name, t_old, t_new, 1e3, "ms")
    model.fuse_elementwise = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["ops", "steps"], help="run one part (default: both)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the kernels follow them)")
    ap.add_argument("--rows", default="16,1024,2048", help="rows per op call, comma-separated")
    ap.add_argument("--repeats", type=int, default=400, help="per op at <= 64 rows (a tenth above)")
    ap.add_argument("--step-repeats", type=int, default=10)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    print(f"{args.model}, float32, {args.threads} threads", flush=True)
    with torch.inference_mode():
        if args.only in (None, "ops"):
            bench_ops(loaded.spec, [int(r) for r in args.rows.split(",")], args.repeats)
        if args.only in (None, "steps"):
            model = LlamaModel(loaded.spec, loaded.weights, torch.device("cpu"))
            bench_steps(model, args.prompt_len, args.decode_batch, args.context, args.step_repeats)


if __name__ == "__main__":
    main()
