"""Attention-side access to a paged, head-major KV pool `[num_blocks, 2, Hkv, block_size, D]`.

Index 0 of dim 1 is K, 1 is V. `scatter_tokens` writes new tokens into their (block, offset)
slots; `gather_kv` turns a request's blocks into K and V laid out for SDPA, `[2, Hkv, length, D]`.

In this layout a block holds, per (K|V, head), one contiguous `block_size x D` slab, and in the SDPA
layout the slabs of one (K|V, head) for consecutive blocks sit end to end. A gather is therefore
`n * 2 * Hkv` independent slab copies, `pool[id, kv, h] -> out[kv, h, i*bs:(i+1)*bs]`:
  * the torch path (the reference; CPU and CUDA) does them as one `index_select` on the block dim
    of a permuted view;
  * on CUDA with CuPy importable, a kernel does them with one thread block per slab, threads copying
    the widest word (16/8/4/1 bytes) that the slab size and both base pointers allow, launched on
    torch's current stream.
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings

import numpy as np
import torch

IMPLS = ("auto", "torch", "cupy")

# One kernel per copy width; `alignas` keeps the 16-byte word self-contained (no vector headers).
# Slab s is (i, kv, h) in source order: i = s / kvh, r = s % kvh = kv * Hkv + h, where kvh = 2 * Hkv.
# Source slab: pool[id, kv, h] = pool slab id * kvh + r; destination: out[kv, h, i] = out slab
# r * n + i. An id outside [0, num_blocks) zero-fills its slabs instead of reading outside the pool.
# CPU tests build this source for the host (CUDA built-ins shimmed) and also run `_emulate_launch`,
# its numpy mirror, line by line: keep the two in step.
_KERNEL_SRC = r"""
struct alignas(16) Word16 { unsigned long long lo, hi; };
typedef unsigned long long Word8;  // one-token names: `T()` must be a valid value-initialisation
typedef unsigned int Word4;
typedef unsigned char Word1;

#define GATHER_KV(NAME, T)                                                                 \
extern "C" __global__ void NAME(const T* __restrict__ pool, T* __restrict__ out,           \
                                const long long* __restrict__ ids, long long n,            \
                                long long kvh, long long slab_words, long long num_blocks) { \
    const long long slabs = n * kvh;                                                       \
    for (long long s = blockIdx.x; s < slabs; s += gridDim.x) {                            \
        const long long i = s / kvh;                                                       \
        const long long r = s - i * kvh;                                                   \
        const long long id = ids[i];                                                       \
        const bool ok = id >= 0 && id < num_blocks;                                        \
        const T* src = pool + ((ok ? id : 0) * kvh + r) * slab_words;                      \
        T* dst = out + (r * n + i) * slab_words;                                           \
        for (long long w = threadIdx.x; w < slab_words; w += blockDim.x)                   \
            dst[w] = ok ? src[w] : T();                                                    \
    }                                                                                      \
}

GATHER_KV(gather_kv_16, Word16)
GATHER_KV(gather_kv_8, Word8)
GATHER_KV(gather_kv_4, Word4)
GATHER_KV(gather_kv_1, Word1)
"""
_WIDTHS = (16, 8, 4, 1)
_MAX_GRID = 65535  # grid-stride beyond this: plenty of blocks in flight on any GPU
_MAX_THREADS = 256


@functools.cache
def _cupy():
    try:
        import cupy
    except Exception:  # not installed, or installed without a usable CUDA runtime
        return None
    return cupy


@functools.cache
def _kernels(device_index: int) -> dict:
    """{width: kernel function}, compiled (NVRTC) and loaded on the device; raises if it cannot be.
    One module per device, first touched with that device current (get_function loads it)."""
    cp = _cupy()
    with cp.cuda.Device(device_index):
        module = cp.RawModule(code=_KERNEL_SRC)
        return {w: module.get_function(f"gather_kv_{w}") for w in _WIDTHS}


_broken: list[str] = []  # set once the kernel failed to build: "auto" then stays on torch


def _check(pool: torch.Tensor, ids: torch.Tensor, length: int) -> None:
    if pool.dim() != 5:
        raise ValueError(f"pool must be [num_blocks, 2, Hkv, block_size, D], got {tuple(pool.shape)}")
    cap = ids.numel() * pool.shape[3]
    if not 0 <= length <= cap:
        raise ValueError(f"length {length} outside the {ids.numel()} blocks' {cap} slots")


def _kernel_usable(pool: torch.Tensor) -> bool:
    return pool.is_cuda and pool.is_contiguous() and _cupy() is not None


def gather_kv(pool: torch.Tensor, block_ids: torch.Tensor, length: int, *,
              impl: str = "auto") -> torch.Tensor:
    """A request's K and V for one layer, ready for SDPA: `[2, Hkv, length, D]`, with
    `out[kv, h, t] == pool[block_ids[t // bs], kv, h, t % bs]`.

    The result is the `[:, :, :length]` view of a fresh contiguous `[2, Hkv, n * bs, D]` buffer
    (n = len(block_ids)). Block ids must lie in [0, num_blocks): torch raises on others (or, on CUDA,
    trips a device assert), the kernel zero-fills their slots rather than read outside the pool.
    impl: "auto" takes the CuPy kernel for a contiguous CUDA pool when CuPy imports (falling back to
    torch, with one warning, if the kernel cannot be built); "torch" forces the reference path;
    "cupy" insists on the kernel.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    ids = torch.as_tensor(block_ids).reshape(-1).to(device=pool.device, dtype=torch.int64)
    length = int(length)
    _check(pool, ids, length)
    if impl == "cupy" or (impl == "auto" and not _broken and _kernel_usable(pool)):
        if not _kernel_usable(pool):
            raise RuntimeError("the CuPy gather needs a contiguous CUDA pool and cupy-cuda12x")
        try:
            kernels = _kernels(pool.device.index)
        except Exception as exc:
            if impl == "cupy":
                raise
            _broken.append(repr(exc))
            warnings.warn(f"CuPy gather_kv kernel could not be built, using torch indexing: {exc!r}",
                          RuntimeWarning, stacklevel=2)
        else:
            return _gather_slabs(pool, ids, length, functools.partial(_launch_cupy, kernels, pool.device))
    # index_select on the block dim of the permuted view `[2, Hkv, num_blocks, bs, D]` yields a
    # contiguous `[2, Hkv, n, bs, D]`, whose reshape to `[2, Hkv, n * bs, D]` is free. (On CPU it
    # copies whole slabs, over twice as fast as advanced indexing's element-wise TensorIterator.)
    two, hkv, bs, d = pool.shape[1:]
    kv = pool.permute(1, 2, 0, 3, 4).index_select(2, ids)
    return kv.reshape(two, hkv, ids.numel() * bs, d)[:, :, :length]


def _gather_slabs(pool: torch.Tensor, ids: torch.Tensor, length: int, launch) -> torch.Tensor:
    """The kernel path: allocate the SDPA buffer, launch one slab copy per (block, K|V, head)."""
    two, hkv, bs, d = pool.shape[1:]
    out = torch.empty((two, hkv, ids.numel() * bs, d), dtype=pool.dtype, device=pool.device)
    ids = ids.contiguous()  # held until after the launch: the kernel reads it through a raw pointer
    config = _launch_args(pool, ids, out)
    if config is not None:
        launch(*config)
    return out[:, :, :length]


def _launch_args(pool: torch.Tensor, ids: torch.Tensor, out: torch.Tensor):
    """(width, grid, threads, kernel args) for gathering `ids` from `pool` into `out`, or None
    when there is nothing to copy. Shared by the CUDA launch and the CPU emulation."""
    n = ids.numel()
    kvh = pool.shape[1] * pool.shape[2]
    slab_bytes = pool.shape[3] * pool.shape[4] * pool.element_size()
    if n == 0 or kvh == 0 or slab_bytes == 0:
        return None
    assert out.is_contiguous() and out.numel() == n * kvh * pool.shape[3] * pool.shape[4]
    width = next(w for w in _WIDTHS
                 if slab_bytes % w == 0 and pool.data_ptr() % w == 0 and out.data_ptr() % w == 0)
    slab_words = slab_bytes // width
    threads = min(_MAX_THREADS, 32 * math.ceil(slab_words / 32))
    grid = min(n * kvh, _MAX_GRID)
    args = (np.uint64(pool.data_ptr()), np.uint64(out.data_ptr()), np.uint64(ids.data_ptr()),
            np.int64(n), np.int64(kvh), np.int64(slab_words), np.int64(pool.shape[0]))
    return width, grid, threads, args


def _launch_cupy(kernels: dict, device: torch.device, width: int, grid: int, threads: int,
                 args: tuple) -> None:
    cp = _cupy()
    stream = torch.cuda.current_stream(device)
    with cp.cuda.Device(device.index), cp.cuda.ExternalStream(stream.cuda_stream):
        kernels[width]((grid,), (threads,), args)


def _emulate_launch(width: int, grid: int, threads: int, args: tuple) -> None:
    """Run the kernel's loops on host memory, through the same raw pointers and arguments (CPU
    tensors only): checks the launch arithmetic and slab mapping where there is no GPU."""
    pool_p, out_p, ids_p, n, kvh, slab_words, num_blocks = (int(a) for a in args)

    def words(ptr: int, count: int) -> np.ndarray:  # `count` words of `width` bytes at ptr
        buf = (ctypes.c_uint8 * (count * width)).from_address(ptr)
        return np.ctypeslib.as_array(buf).reshape(count, width)

    pool = words(pool_p, num_blocks * kvh * slab_words)
    out = words(out_p, n * kvh * slab_words)
    ids = np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(ids_p))
    slabs = n * kvh
    for block_x in range(grid):
        for s in range(block_x, slabs, grid):
            i = s // kvh
            r = s - i * kvh
            id_ = int(ids[i])
            ok = 0 <= id_ < num_blocks
            src = ((id_ if ok else 0) * kvh + r) * slab_words
            dst = (r * n + i) * slab_words
            for t in range(threads):  # thread t copies words t, t + threads, ...
                d = out[dst + t:dst + slab_words:threads]
                d[:] = pool[src + t:src + slab_words:threads] if ok else 0


def scatter_tokens(pool: torch.Tensor, block_ids: torch.Tensor, offsets: torch.Tensor,
                   values: torch.Tensor) -> None:
    """Write new tokens: `pool[block_ids[t], :, :, offsets[t]] = values[t]`, values `[T, 2, Hkv, D]`
    (K and V stacked on dim 1); block_ids[t] = block_table[pos // bs], offsets[t] = pos % bs.
    The (block, offset) slots must be distinct."""
    ids = block_ids.reshape(-1).to(device=pool.device, dtype=torch.int64)
    off = offsets.reshape(-1).to(device=pool.device, dtype=torch.int64)
    want = (ids.numel(), pool.shape[1], pool.shape[2], pool.shape[4])
    if off.numel() != ids.numel() or tuple(values.shape) != want:
        raise ValueError(f"scatter_tokens: {ids.numel()} block ids, {off.numel()} offsets; values "
                         f"must be {want}, got {tuple(values.shape)}")
    values = values.to(device=pool.device, dtype=pool.dtype)
    if not pool.is_contiguous():
        # Advanced indices split by slices: torch puts the token dim first, so the target is [T, 2, Hkv, D].
        pool[ids, :, :, off] = values
        return
    # One row copy per (token, K/V, head) into the pool seen as rows of D: index_copy_ runs serially
    # for a decode step's few rows, where index_put_ enters a parallel region (its OpenMP barrier
    # cost up to 15 ms a call on a 2-core box whose other core was busy).
    _, kv, hkv, bs, d = pool.shape
    slab = torch.arange(kv * hkv, device=pool.device)  # (K/V, head) in values' order
    rows = ((ids[:, None] * (kv * hkv) + slab[None, :]) * bs + off[:, None]).reshape(-1)
    pool.view(-1, d).index_copy_(0, rows, values.reshape(-1, d))
