"""Attention-side block access on a paged KV pool `[num_blocks, 2, block_size, Hkv, D]`.

`gather_blocks` turns a request's blocks into one contiguous tensor; `scatter_rows` writes new
tokens into their (block, offset) slots. The torch path runs anywhere and is the reference; on CUDA
with CuPy importable, the gather uses a block-copy kernel instead (one CUDA block per KV block,
threads copying 16-byte words), launched on torch's current stream.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch

IMPLS = ("auto", "torch", "cupy")

# One kernel per copy width; `alignas` keeps the 16-byte word self-contained (no vector headers).
# An out-of-range id zero-fills its output block instead of reading outside the pool.
_KERNEL_SRC = r"""
struct alignas(16) Word16 { unsigned long long lo, hi; };

#define GATHER_ROWS(NAME, T)                                                              \
extern "C" __global__ void NAME(const T* __restrict__ pool, T* __restrict__ out,          \
                                const long long* __restrict__ ids, long long n,           \
                                long long row_words, long long num_rows) {                \
    for (long long r = blockIdx.x; r < n; r += gridDim.x) {                               \
        const long long id = ids[r];                                                      \
        T* dst = out + r * row_words;                                                     \
        const bool ok = id >= 0 && id < num_rows;                                         \
        const T* src = pool + (ok ? id : 0) * row_words;                                  \
        for (long long i = threadIdx.x; i < row_words; i += blockDim.x)                   \
            dst[i] = ok ? src[i] : T();                                                   \
    }                                                                                     \
}

GATHER_ROWS(gather_rows_16, Word16)
GATHER_ROWS(gather_rows_8, unsigned long long)
GATHER_ROWS(gather_rows_4, unsigned int)
GATHER_ROWS(gather_rows_1, unsigned char)
"""
_WIDTHS = (16, 8, 4, 1)
_MAX_GRID = 65535  # grid-stride beyond this: plenty of blocks in flight on any GPU


@functools.cache
def _cupy():
    try:
        import cupy
    except Exception:  # not installed, or installed without a usable CUDA runtime
        return None
    return cupy


@functools.cache
def _kernel(width: int):
    return _cupy().RawKernel(_KERNEL_SRC, f"gather_rows_{width}")


_broken: list[str] = []  # set once the kernel failed to build or load: "auto" then stays on torch


def _kernel_usable(pool: torch.Tensor, out: torch.Tensor | None) -> bool:
    return (pool.is_cuda and pool.is_contiguous() and pool.dim() >= 1
            and (out is None or out.is_contiguous()) and _cupy() is not None)


def gather_blocks(pool: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None,
                  *, impl: str = "auto") -> torch.Tensor:
    """`pool[block_ids]` as a new (or the given `out`) tensor `[n, *pool.shape[1:]]`.

    impl: "auto" takes the CuPy kernel when it can (CUDA pool, contiguous tensors, CuPy present),
    else torch; "torch" forces the reference path; "cupy" insists on the kernel.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    ids = block_ids.reshape(-1).to(device=pool.device, dtype=torch.int64)
    if impl == "cupy" or (impl == "auto" and not _broken and _kernel_usable(pool, out)):
        if not _kernel_usable(pool, out):
            raise RuntimeError("the CuPy gather needs a contiguous CUDA pool and out, and cupy-cuda12x")
        try:
            return _gather_kernel(pool, ids, out)
        except Exception as exc:
            if impl == "cupy" or isinstance(exc, ValueError):
                raise
            _broken.append(repr(exc))
            warnings.warn(f"CuPy gather kernel unavailable, using torch index_select: {exc!r}")
    if out is None:
        return pool.index_select(0, ids)
    return torch.index_select(pool, 0, ids, out=out)


def _gather_kernel(pool: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    cp = _cupy()
    shape = (ids.numel(), *pool.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=pool.dtype, device=pool.device)
    elif tuple(out.shape) != shape or out.dtype != pool.dtype or out.device != pool.device:
        raise ValueError(f"out must be {shape} {pool.dtype} on {pool.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    row_bytes = math.prod(pool.shape[1:]) * pool.element_size()
    if ids.numel() == 0 or row_bytes == 0:
        return out
    ids = ids.contiguous()
    width = next(w for w in _WIDTHS
                 if row_bytes % w == 0 and pool.data_ptr() % w == 0 and out.data_ptr() % w == 0)
    row_words = row_bytes // width
    threads = min(256, 32 * math.ceil(row_words / 32))
    grid = min(ids.numel(), _MAX_GRID)
    args = (np.uint64(pool.data_ptr()), np.uint64(out.data_ptr()), np.uint64(ids.data_ptr()),
            np.int64(ids.numel()), np.int64(row_words), np.int64(pool.shape[0]))
    stream = torch.cuda.current_stream(pool.device)
    with cp.cuda.Device(pool.device.index), cp.cuda.ExternalStream(stream.cuda_stream):
        _kernel(width)((grid,), (threads,), args)
    return out


def scatter_rows(pool: torch.Tensor, block_ids: torch.Tensor, offsets: torch.Tensor,
                 values: torch.Tensor) -> None:
    """Write token t into its slot: `pool[block_ids[t], :, offsets[t]] = values[t]`.

    For a KV pool `[N, 2, block_size, Hkv, D]`, values is `[T, 2, Hkv, D]` (K and V stacked on dim
    1); block_ids[t] = block_table[pos // block_size] and offsets[t] = pos % block_size.
    """
    ids = block_ids.reshape(-1).to(device=pool.device, dtype=torch.int64)
    off = offsets.reshape(-1).to(device=pool.device, dtype=torch.int64)
    want = (ids.numel(), pool.shape[1], *pool.shape[3:])
    if off.numel() != ids.numel() or tuple(values.shape) != want:
        raise ValueError(f"scatter_rows: {ids.numel()} block ids, {off.numel()} offsets; values "
                         f"must be {want}, got {tuple(values.shape)}")
    # Advanced indices split by a slice: torch puts the token dim first, so the target is [T, 2, ...].
    pool[ids, :, off] = values.to(device=pool.device, dtype=pool.dtype)


# ---- head-major layout used by the engine: pool `[num_blocks, 2, Hkv, block_size, D]` ----------
def gather_kv(pool: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """A request's K and V for one layer, ready for SDPA: `[2, Hkv, length, D]`.

    One copy: indexing the block dim of the permuted view `[2, Hkv, num_blocks, bs, D]` yields a
    contiguous `[2, Hkv, n, bs, D]`, whose reshape to `[2, Hkv, n * bs, D]` is free; each copied
    run is a whole `bs x D` slab of one head.
    """
    ids = block_ids.to(pool.device, torch.int64)
    two, hkv, bs, d = pool.shape[1:]
    kv = pool.permute(1, 2, 0, 3, 4)[:, :, ids]
    return kv.reshape(two, hkv, ids.numel() * bs, d)[:, :, :length]


def scatter_tokens(pool: torch.Tensor, block_ids: torch.Tensor, offsets: torch.Tensor,
                   values: torch.Tensor) -> None:
    """Write new tokens: `pool[block_ids[t], :, :, offsets[t]] = values[t]`, values `[T, 2, Hkv, D]`."""
    pool[block_ids.to(pool.device), :, :, offsets.to(pool.device)] = values.to(pool.dtype)
