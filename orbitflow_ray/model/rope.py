"""Rotary position embedding, bit-for-bit the same as transformers' Llama/Qwen2 RoPE.

Greedy decoding is only token-identical to the reference if every float matches, so this module copies
transformers' arithmetic op for op: inverse frequencies in float32 on the CPU (scaled types such as
`llama3` are computed by transformers' own `ROPE_INIT_FUNCTIONS`), `positions.float() * inv_freq`
elementwise (not a matmul), `cat(freqs, freqs)`, `cos() * attention_scaling`, a cast to the activation
dtype, then `q * cos + rotate_half(q) * sin`. cos/sin are recomputed per call rather than gathered
from a table: a cached table is cheaper but CPU `cos` is not guaranteed to round identically across
tensor shapes, and the cost (N x head_dim transcendental ops) is negligible next to attention.
`apply_cos_sin(..., fused=True)` rotates CPU float32 q and k in one compiled pass
(orbitflow_kernels/numba_elementwise.py) with the same floats (no FMA: each product rounded, as here).
"""

from __future__ import annotations

import torch

from orbitflow_ray.model.spec import ModelSpec


def inv_freq_and_scaling(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """The float32 inverse frequencies [head_dim // 2] and the cos/sin post-scaling factor."""
    rope_type = (spec.rope_scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        # Same expression as LlamaRotaryEmbedding.compute_default_rope_parameters (which is not registered
        # in ROPE_INIT_FUNCTIONS, and importing modeling_llama for it would cost seconds).
        dim = spec.head_dim
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from orbitflow_ray.model.hf_config import to_hf_config

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        # dynamic NTK changes inv_freq with the sequence length at run time; we only do static ones.
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](to_hf_config(spec), None)
    return inv_freq.to(torch.float32), float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`(x * cos) + (rotate_half(x) * sin)`, the last two ops in place on fresh temporaries."""
    return (x * cos).add_(rotate_half(x).mul_(sin))


class RotaryEmbedding:
    """cos/sin for flattened token positions, and their application to q [N, H, D] and k [N, Hkv, D]."""

    def __init__(self, spec: ModelSpec, device: torch.device | str | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        inv_freq, self.attention_scaling = inv_freq_and_scaling(spec)
        self.inv_freq = inv_freq.to(self.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [N, head_dim] in `dtype`, for positions [N]."""
        freqs = positions.to(self.device)[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    @staticmethod
    def apply_cos_sin(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [N, H, D] and k [N, Hkv, D]; cos/sin [N, D] are cast to q's dtype first, as transformers
        casts them to the activations'. fused: one compiled pass over CPU float32 q, k (the same floats)."""
        if fused and q.device.type == "cpu" and q.dtype == k.dtype == torch.float32:
            from orbitflow_kernels import numba_elementwise
            return numba_elementwise.rope(q, k, cos.to(q.dtype), sin.to(q.dtype))
        cos = cos.to(q.dtype).unsqueeze(1)
        sin = sin.to(q.dtype).unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply_cos_sin(q, k, *self.cos_sin(positions, q.dtype))
