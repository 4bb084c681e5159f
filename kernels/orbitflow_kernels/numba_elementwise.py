"""The decoder layer's elementwise math on the CPU as compiled loops (Numba): one pass per op.

    h = rms_norm(x, weight, eps)          # [N, hidden]: x * rsqrt(mean(x^2) + eps) * weight
    q, k = rope(q, k, cos, sin)           # [N, H, D], [N, Hkv, D]: x * cos + rotate_half(x) * sin
    a = silu_mul(gate_up)                 # [N, 2I] -> [N, I]: silu(gate) * up

torch runs these as 5 (RMSNorm), 5 per tensor (RoPE) and 2 (SwiGLU) passes over memory, each with
its own temporaries and dispatch; here each is one loop over rows that reads its inputs once.

A row's output depends on that row alone: rows are independent tasks, and the serial and parallel
paths inline the same row code. RMSNorm's sum of squares is vectorised with reassociation (fastmath
reassoc and contract, as numba_kernel), so its order is fixed by the compiled loop and the row
length, not by the batch or the thread count (tests/test_model_math.py checks single rows against
the same rows in a 2,048-row parallel call, bit for bit); it is within ~1 ulp of torch's. RoPE has
no fastmath: torch's floats bit for bit. SwiGLU computes exp(-gate) by range reduction and a
degree-7 polynomial (FMA-contracted), which vectorises where Numba's exp calls libm per element
(5x slower here); within ~1e-6 relative of torch's SiLU.

Rows run in parallel (torch's intra-op thread count, through numba_kernel's pool) from
`PARALLEL_MIN_ELEMS` elements up, serially below (a decode step's 16 rows: waking the pool saved
little on a quiet box, and cost milliseconds a call when the box was loaded). Compiled on first use (or by `warm_up`, which `make install` runs), cached
beside this file; fp32 CPU tensors only (the callers in orbitflow_ray/model keep torch's ops for
other dtypes and devices).
"""

from __future__ import annotations

import numpy as np
import torch

from orbitflow_kernels.numba_kernel import _exp_neg, run, use_torch_threads  # sizes Numba's pool before its import here

from numba import njit, prange  # noqa: E402

PARALLEL_MIN_ELEMS = 1 << 15  # elements of a call's output from which rows are split over threads

_F0, _F1 = np.float32(0.0), np.float32(1.0)


@njit(inline="always", nogil=True)
def _rms_row(x, w, eps, out, r):  # pragma: no cover - compiled
    d = x.shape[1]
    s = _F0
    for j in range(d):
        s += x[r, j] * x[r, j]
    inv = _F1 / np.sqrt(s / np.float32(d) + eps)
    for j in range(d):
        out[r, j] = (x[r, j] * inv) * w[j]


@njit(parallel=True, fastmath={"reassoc", "contract"}, error_model="numpy", cache=True, nogil=True)
def _rms_norm(x, w, eps, out, parallel):  # pragma: no cover - compiled
    if parallel:
        for r in prange(x.shape[0]):
            _rms_row(x, w, eps, out, r)
    else:
        for r in range(x.shape[0]):
            _rms_row(x, w, eps, out, r)


@njit(inline="always", nogil=True)
def _rope_heads(x, o, cos, sin, r):  # pragma: no cover - compiled
    # o = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[half:], x[:half]), as torch rounds it;
    # both halves in one loop (half the loop overhead of two: 0.6x the time at 1,024 rows)
    half = x.shape[2] // 2
    c, s = cos[r], sin[r]
    for h in range(x.shape[1]):
        xh, oh = x[r, h], o[r, h]
        for j in range(half):
            a, b = xh[j], xh[j + half]
            oh[j] = a * c[j] + (-b) * s[j]
            oh[j + half] = b * c[j + half] + a * s[j + half]


@njit(inline="always", nogil=True)
def _rope_row(q, k, cos, sin, q_out, k_out, r):  # pragma: no cover - compiled
    _rope_heads(q, q_out, cos, sin, r)
    _rope_heads(k, k_out, cos, sin, r)


@njit(parallel=True, error_model="numpy", cache=True, nogil=True)
def _rope(q, k, cos, sin, q_out, k_out, parallel):  # pragma: no cover - compiled
    if parallel:
        for r in prange(q.shape[0]):
            _rope_row(q, k, cos, sin, q_out, k_out, r)
    else:
        for r in range(q.shape[0]):
            _rope_row(q, k, cos, sin, q_out, k_out, r)


@njit(inline="always", nogil=True)
def _silu_mul_row(gu, out, r):  # pragma: no cover - compiled
    m = out.shape[1]
    for j in range(m):
        g = gu[r, j]
        out[r, j] = g / (_F1 + _exp_neg(g)) * gu[r, m + j]


@njit(parallel=True, fastmath={"contract"}, error_model="numpy", cache=True, nogil=True)
def _silu_mul(gu, out, parallel):  # pragma: no cover - compiled
    if parallel:
        for r in prange(out.shape[0]):
            _silu_mul_row(gu, out, r)
    else:
        for r in range(out.shape[0]):
            _silu_mul_row(gu, out, r)


def _parallel(elems: int) -> bool:
    if elems < PARALLEL_MIN_ELEMS:
        return False
    use_torch_threads()
    return True


def _check(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            raise ValueError(f"{name} takes float32 CPU tensors, got a {t.device} {t.dtype} one")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight: a fresh [N, hidden] tensor for x [N, hidden] (rows
    may be strided) and weight [hidden], both float32 on the CPU."""
    _check("rms_norm", x, weight)
    if x.dim() != 2 or weight.shape != x.shape[1:]:
        raise ValueError(f"rms_norm needs x [N, hidden] and weight [hidden], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    out = torch.empty(x.shape, dtype=torch.float32)
    run(_rms_norm, x.numpy(), weight.contiguous().numpy(), np.float32(eps), out.numpy(), _parallel(x.numel()))
    return out


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k): fresh contiguous tensors for q [N, H, D] and
    k [N, Hkv, D] (any strides, e.g. views of the qkv GEMM's output) and cos, sin [N, D]; float32 CPU."""
    _check("rope", q, k, cos, sin)
    n, _, d = q.shape
    if k.dim() != 3 or k.shape[0] != n or k.shape[2] != d or cos.shape != (n, d) or sin.shape != (n, d) or d % 2:
        raise ValueError(f"rope needs q [N, H, D], k [N, Hkv, D] and cos, sin [N, D] with D even, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    q_out = torch.empty(q.shape, dtype=torch.float32)
    k_out = torch.empty(k.shape, dtype=torch.float32)
    run(_rope, q.numpy(), k.numpy(), cos.numpy(), sin.numpy(), q_out.numpy(), k_out.numpy(),
        _parallel(q.numel() + k.numel()))
    return q_out, k_out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [N, 2I] (gate columns first, as the gate/up GEMM writes them):
    a fresh [N, I] tensor; float32 CPU."""
    _check("silu_mul", gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul needs gate_up [N, 2I], got {tuple(gate_up.shape)}")
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=torch.float32)
    run(_silu_mul, gate_up.numpy(), out.numpy(), _parallel(out.numel()))
    return out


def warm_up() -> None:
    """Compile (or load from the cache) each kernel for the layouts the model hands it: contiguous
    activations, and q/k as strided views of the qkv GEMM's output."""
    q, k, _ = torch.zeros(2, 32).split((16, 8, 8), dim=-1)
    rope(q.view(2, 2, 8), k.view(2, 1, 8), torch.zeros(2, 8), torch.zeros(2, 8))
    rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-5)
    silu_mul(torch.zeros(2, 8))
