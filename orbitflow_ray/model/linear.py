"""Linear layers whose weights are packed once for the CPU's GEMM library.

    qkv = Linear(torch.cat([wq, wk, wv]))   # one GEMM for three projections
    y = qkv(x)                              # [N, in] -> [N, out]
    x = o_proj.add_to(attn, x)              # x + attn @ wo.T, the add fused into the GEMM

On the CPU, for float32 weights, a weight is reordered once at load into oneDNN's blocked layout
(what torch.compile's freezing pass does for `nn.Linear`) and every call runs oneDNN's GEMM on it:
1.1-1.2x torch's MKL `F.linear` at 1,024 rows and 1.2-1.4x at 16 rows of SmolLM2's shapes, one
thread on the project's 2-core box (bench/README.md). Its sums round differently from MKL's (about
1e-6 relative), so outputs are no longer bit-identical to transformers, only close
(tests/logprobs_close.py's rule). At SmolLM2's shapes a row's result did not depend on how many rows
shared the call, except in one-row calls with 1,536-wide inputs (MKL's does, below 8 rows).
Elsewhere (CUDA, bf16, torch without oneDNN) a call is `F.linear` on the weight as loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_DTYPES = (torch.float32,)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `Linear` packs this weight for oneDNN (CPU, float32, oneDNN built in and enabled)."""
    return (weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class Linear:
    """y = x @ weight.T + bias for x [N, in_features]; weight [out_features, in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True) -> None:
        if weight.dim() != 2 or (bias is not None and bias.shape != weight.shape[:1]):
            raise ValueError(f"a linear layer needs a 2-D weight and a bias of its rows, got weight "
                             f"{tuple(weight.shape)} and bias {None if bias is None else tuple(bias.shape)}")
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = pack and can_pack(weight)
        # The packed tensor is opaque (no data pointer); the loaded weight is not kept beside it.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + self(x), a fresh tensor: one pass with oneDNN's add post-op (the same floats
        as the add done after the GEMM), else an in-place add into the GEMM's output."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return self(x).add_(residual)
