"""Our Llama-family forward pass (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2), written against our KV cache.

Tokens of all scheduled requests are flattened into one [N, hidden] batch so every linear layer is
one large matmul; attention is delegated per layer to a callback that knows where each request's KV
lives (device pool or host via staging). q/k/v are one GEMM over their concatenated weights, and
gate/up another (on the CPU a row's floats equal the separate GEMMs', tests/test_model_math.py);
the residual adds ride on the o_proj and down_proj GEMMs (oneDNN's add post-op). On CPU float32
activations RMSNorm, RoPE and SwiGLU run as one compiled pass each (orbitflow_kernels/
numba_elementwise.py): RoPE's floats are transformers', RMSNorm's and SwiGLU's within ~1e-6
relative (summation order, exp); `fuse_elementwise=False` (and CUDA, and bf16) keeps torch's ops, which
compute transformers' floats bit for bit. The linears do not: on the CPU in float32 they run
oneDNN's GEMM on packed weights (`model/linear.py`), which rounds its sums differently from the
MKL GEMM transformers calls, so greedy output matches transformers' token for token except at
near-ties (tests/test_engine_hf.py counts them by vLLM's `check_logprobs_close` rule).
`pack_weights=False` (and CUDA, and bf16) keeps `F.linear`.

Under tensor parallelism (`model/tp.py`) a model holds one shard's weights: its query and KV heads
and MLP columns, with o_proj and down_proj partial sums completed by the `all_reduce` it is given.
The embedding, the final norm and the LM head stay replicated. Without a shard (or with one of
size 1) the forward is the single-device one, op for op; on a shard of more, each residual add
follows its all-reduce instead of riding on the GEMM.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from orbitflow_ray.model.linear import Linear
from orbitflow_ray.model.rope import RotaryEmbedding
from orbitflow_ray.model.spec import ModelSpec
from orbitflow_ray.model.tp import TPShard

# attend(layer, q [N, H, D], k [N, Hkv, D], v [N, Hkv, D]) -> [N, H * D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# all_reduce(t): sums t in place across the shards of a tensor-parallel group.
AllReduceFn = Callable[[torch.Tensor], None]


def fusable(x: torch.Tensor) -> bool:
    """Whether the fused elementwise kernels (orbitflow_kernels/numba_elementwise.py) take x: CPU float32."""
    return x.device.type == "cpu" and x.dtype == torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
    """RMSNorm of x [N, hidden]; fused: one compiled pass where `fusable` (close to these floats, not equal)."""
    if fused and fusable(x) and fusable(weight):
        from orbitflow_kernels import numba_elementwise
        return numba_elementwise.rms_norm(x, weight, eps)
    # transformers' `weight * h.to(dtype)`, with the last multiply in place on the fresh product
    # (IEEE multiplication commutes exactly): one [N, hidden] allocation fewer per norm. torch's
    # F.rms_norm gives the same floats in float32 but is the same ops on the CPU (no fused kernel in
    # torch 2.13), and no faster here.
    dtype = x.dtype
    h = x.to(torch.float32)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return h.mul_(weight)


def swiglu(gate_up: torch.Tensor, intermediate_size: int, fused: bool = False) -> torch.Tensor:
    """silu(gate) * up for the gate/up GEMM's output [N, 2 * intermediate_size] (gate columns first)."""
    if fused and fusable(gate_up):
        from orbitflow_kernels import numba_elementwise
        return numba_elementwise.silu_mul(gate_up)
    gate, up = gate_up.split(intermediate_size, dim=-1)
    # the multiply in place on silu's fresh (contiguous) output
    return F.silu(gate).mul_(up)


class LlamaLayer:
    """One decoder layer's weights: q/k/v as one linear over their concatenated rows (q rows first,
    then k, then v; split by views after), gate/up as one (gate rows first), o and down."""

    def __init__(self, weights: dict[str, torch.Tensor], i: int, pack: bool = True) -> None:
        p = f"layers.{i}."
        self.index = i
        self.in_norm = weights[p + "input_layernorm.weight"]
        self.post_norm = weights[p + "post_attention_layernorm.weight"]
        a = p + "self_attn."
        wq, wk, wv = (weights[a + n + "_proj.weight"] for n in "qkv")
        biases = [weights.get(a + n + "_proj.bias") for n in "qkv"]
        self.qkv_sizes = (wq.shape[0], wk.shape[0], wv.shape[0])
        self.qkv = Linear(torch.cat([wq, wk, wv]), None if biases[0] is None else torch.cat(biases), pack)
        self.o = Linear(weights[a + "o_proj.weight"], pack=pack)
        m = p + "mlp."
        self.intermediate_size = weights[m + "gate_proj.weight"].shape[0]
        self.gate_up = Linear(torch.cat([weights[m + "gate_proj.weight"], weights[m + "up_proj.weight"]]), pack=pack)
        self.down = Linear(weights[m + "down_proj.weight"], pack=pack)


class LlamaModel:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], device: torch.device,
                 shard: TPShard | None = None, all_reduce: AllReduceFn | None = None,
                 pack_weights: bool = True, fuse_elementwise: bool = True) -> None:
        """spec: the whole model's; weights: shard's slices (`tp.shard_weights`) when shard is given;
        pack_weights: False keeps every linear on `F.linear` (the bench's baseline; see model/linear.py);
        fuse_elementwise: False keeps RMSNorm, RoPE and SwiGLU on torch's ops (the bench's baseline;
        True runs them as compiled kernels on CPU float32 activations, torch's ops elsewhere)."""
        if shard is not None and shard.size > 1 and all_reduce is None:
            raise ValueError(f"a shard of a {shard.size}-way tensor-parallel model needs an all_reduce")
        self.spec = spec
        self.device = device
        self.num_heads = shard.num_heads if shard is not None else spec.num_heads
        self.num_kv_heads = shard.num_kv_heads if shard is not None else spec.num_kv_heads
        self.all_reduce = all_reduce if shard is not None and shard.size > 1 else None
        self.num_all_reduces = 0  # issued since construction (the bench and tests count them per step)
        w = {k: v.to(device) for k, v in weights.items()}
        self._weight_bytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in w.values()}.values())
        self.embed = w["embed_tokens.weight"]
        self.norm = w["norm.weight"]
        head = w.get("lm_head.weight", self.embed) if not spec.tie_word_embeddings else self.embed
        # A tied head is packed too, a second copy of the embedding's bytes beside the one the
        # embedding lookup reads (SmolLM2-135M: 113 MB of host memory): a decode step's LM head at 16
        # rows took 22 ms on MKL against 5.5 ms packed on the Zen 5 box of bench/README.md (stop 36),
        # 1 s of a 16 x 1,000 / 64 run. Only the CPU packs, so a GPU holds `weight_bytes` alone; and
        # only a shard that computes logits (rank 0 of a tensor-parallel group) packs its head.
        logits_here = shard is None or shard.rank == 0
        self.lm_head = Linear(head, pack=pack_weights and (logits_here or head is not self.embed))
        self.packed_copy_bytes = head.numel() * head.element_size() if self.lm_head.packed and head is self.embed else 0
        self.layers = [LlamaLayer(w, i, pack_weights) for i in range(spec.num_layers)]
        self.rope = RotaryEmbedding(spec, device=device)
        self.fuse_elementwise = fuse_elementwise

    def weight_bytes(self) -> int:
        """Bytes of this model's (or shard's) weights as loaded, a tied LM head counted once: what a
        GPU holds (the simulator's `Roofline.weight_bytes_per_gpu`). On the CPU a tied head's packed
        copy holds `packed_copy_bytes` more."""
        return self._weight_bytes

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                before_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Hidden states [N, hidden] after the final norm."""
        s, fused = self.spec, self.fuse_elementwise
        x = F.embedding(input_ids, self.embed)
        n = x.shape[0]
        cos_sin = self.rope.cos_sin(positions)
        for layer in self.layers:
            if before_layer is not None:
                before_layer(layer.index)
            h = rms_norm(x, layer.in_norm, s.rms_norm_eps, fused)
            q, k, v = layer.qkv(h).split(layer.qkv_sizes, dim=-1)  # views of one [N, q + 2 kv] GEMM output
            q, k = self.rope.apply_cos_sin(q.view(n, self.num_heads, s.head_dim),
                                           k.view(n, self.num_kv_heads, s.head_dim), *cos_sin, fused=fused)
            x = self._residual(layer.o, attend(layer.index, q, k, v.view(n, self.num_kv_heads, s.head_dim)), x)
            h = rms_norm(x, layer.post_norm, s.rms_norm_eps, fused)
            x = self._residual(layer.down, swiglu(layer.gate_up(h), layer.intermediate_size, fused), x)
        return rms_norm(x, self.norm, s.rms_norm_eps, fused)

    def _residual(self, linear: Linear, inp: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x + linear(inp); a row-parallel linear's output is first summed over the shards."""
        if self.all_reduce is None:
            return linear.add_to(inp, x)
        partial = linear(inp)
        self.all_reduce(partial)
        self.num_all_reduces += 1
        return x.add_(partial)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
