"""Our Llama-family forward pass (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2), written against our KV cache.

Tokens of all scheduled requests are flattened into one [N, hidden] batch so every linear layer is
one large matmul; attention is delegated per layer to a callback that knows where each request's KV
lives (device pool or host via staging). The arithmetic mirrors transformers' modeling_llama op for
op (fp32 RMSNorm, rotate-half RoPE, SDPA) so greedy output is token-identical to it.

Under tensor parallelism (`model/tp.py`) a model holds one shard's weights: its query and KV heads
and MLP columns, with o_proj and down_proj partial sums completed by the `all_reduce` it is given.
The embedding, the final norm and the LM head stay replicated. Without a shard (or with one of
size 1) the forward is the single-device one, op for op.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from orbitflow_ray.model.rope import RotaryEmbedding
from orbitflow_ray.model.spec import ModelSpec
from orbitflow_ray.model.tp import TPShard

# attend(layer, q [N, H, D], k [N, Hkv, D], v [N, Hkv, D]) -> [N, H * D]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# all_reduce(t): sums t in place across the shards of a tensor-parallel group.
AllReduceFn = Callable[[torch.Tensor], None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' `weight * h.to(dtype)`, with the last multiply in place on the fresh product
    # (IEEE multiplication commutes exactly): one [N, hidden] allocation fewer per norm.
    dtype = x.dtype
    h = x.to(torch.float32)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return h.mul_(weight)


class LlamaLayer:
    def __init__(self, weights: dict[str, torch.Tensor], i: int) -> None:
        p = f"layers.{i}."
        self.index = i
        self.in_norm = weights[p + "input_layernorm.weight"]
        self.post_norm = weights[p + "post_attention_layernorm.weight"]
        a = p + "self_attn."
        self.wq, self.wk, self.wv, self.wo = (weights[a + n + "_proj.weight"] for n in "qkvo")
        self.bq, self.bk, self.bv = (weights.get(a + n + "_proj.bias") for n in "qkv")
        m = p + "mlp."
        self.w_gate, self.w_up, self.w_down = (weights[m + n + "_proj.weight"] for n in ("gate", "up", "down"))


class LlamaModel:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], device: torch.device,
                 shard: TPShard | None = None, all_reduce: AllReduceFn | None = None) -> None:
        """spec: the whole model's; weights: shard's slices (`tp.shard_weights`) when shard is given."""
        if shard is not None and shard.size > 1 and all_reduce is None:
            raise ValueError(f"a shard of a {shard.size}-way tensor-parallel model needs an all_reduce")
        self.spec = spec
        self.device = device
        self.num_heads = shard.num_heads if shard is not None else spec.num_heads
        self.num_kv_heads = shard.num_kv_heads if shard is not None else spec.num_kv_heads
        self.all_reduce = all_reduce if shard is not None and shard.size > 1 else None
        self.num_all_reduces = 0  # issued since construction (the bench and tests count them per step)
        w = {k: v.to(device) for k, v in weights.items()}
        self.embed = w["embed_tokens.weight"]
        self.norm = w["norm.weight"]
        self.lm_head = w.get("lm_head.weight", self.embed) if not spec.tie_word_embeddings else self.embed
        self.layers = [LlamaLayer(w, i) for i in range(spec.num_layers)]
        self.rope = RotaryEmbedding(spec, device=device)

    def weight_bytes(self) -> int:
        """Bytes of the weight tensors this model (or shard) holds, a tied LM head counted once."""
        tensors = [self.embed, self.norm, self.lm_head] + [t for layer in self.layers for t in vars(layer).values()
                                                           if isinstance(t, torch.Tensor)]
        unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
        return sum(unique.values())

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                before_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Hidden states [N, hidden] after the final norm."""
        s = self.spec
        x = F.embedding(input_ids, self.embed)
        n = x.shape[0]
        cos_sin = self.rope.cos_sin(positions)
        for layer in self.layers:
            if before_layer is not None:
                before_layer(layer.index)
            h = rms_norm(x, layer.in_norm, s.rms_norm_eps)
            q = F.linear(h, layer.wq, layer.bq).view(n, self.num_heads, s.head_dim)
            k = F.linear(h, layer.wk, layer.bk).view(n, self.num_kv_heads, s.head_dim)
            v = F.linear(h, layer.wv, layer.bv).view(n, self.num_kv_heads, s.head_dim)
            q, k = self.rope.apply_cos_sin(q, k, *cos_sin)
            o = attend(layer.index, q, k, v)
            # In-place residual adds and SwiGLU: the same float ops as transformers' out-of-place
            # ones, without a fresh (page-faulting) [N, hidden] or [N, intermediate] buffer each.
            x.add_(self._reduce(F.linear(o, layer.wo)))
            h = rms_norm(x, layer.post_norm, s.rms_norm_eps)
            gate = F.silu(F.linear(h, layer.w_gate), inplace=True)
            x.add_(self._reduce(F.linear(gate.mul_(F.linear(h, layer.w_up)), layer.w_down)))
        return rms_norm(x, self.norm, s.rms_norm_eps)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel linear's output summed over the shards (unchanged without TP)."""
        if self.all_reduce is not None:
            self.all_reduce(partial)
            self.num_all_reduces += 1
        return partial

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
