"""Decode attention over a paged KV pool, read in place: one call for a whole batch of sequences.

Each sequence has one query (its newest token, whose K/V is already written to the pool) and
attends over its first `seq_lens[r]` keys, found through its block-table row. All four
implementations compute the same softmax-weighted sum in fp32 and never copy a sequence's KV into
a contiguous buffer; torch and triton run flash-decoding (the keys cut into tiles of blocks, each
tile's scores reduced with a running max and sum, the partial results merged), cpp and numba two
passes over the row (every score, one softmax, then the values):
  * "torch" (CPU and CUDA): a loop over tiles of `tile_blocks` blocks; each tile indexes the pool
    for every sequence at once ([R, tile, 2, Hkv, bs, D], bounded whatever the context length);
  * "cpp" (CPU, fp32 pools, head_dim 64 or 128, up to 8 query heads per KV head):
    `csrc/paged_decode.cpp` in the library `cpu_kernels` builds; one task per (sequence, KV head)
    walking its blocks in place twice, all query heads of the KV head together (GQA), as vLLM's CPU
    kernel splits it, in 16-lane vector code, prefetching each next block (a row's blocks sit on
    scattered pages the hardware prefetcher does not follow). The fastest on the CPU: 0.57-0.67 ms
    a layer at 16 x 1,000 tokens (SmolLM2's 9/3 heads) against Numba's 1.02-1.16 on the Zen 5 box
    of bench/README.md;
  * "numba" (CPU, fp32 pools, any head_dim): the same loop compiled by Numba (`numba_kernel.py`),
    about 10x the torch loop at 16 x 1K tokens;
  * "triton" (CUDA): one program per (sequence, KV head, split of the blocks), looping over its
    blocks one at a time, all query heads of the KV head together (GQA); the splits' partial
    (max, sum, output) are merged after. `triton_kernel.py` holds the kernel.
"auto" takes triton for a CUDA pool when Triton imports; for a CPU fp32 pool cpp where it is built
for the shape and for AVX-512 (`cpu_kernels.preferred()`), else numba; else torch. Each sequence's
output is independent of the batch around it in every implementation.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from orbitflow_kernels import cpu_kernels

IMPLS = ("auto", "torch", "cpp", "numba", "triton")
_NUMBA_DTYPES = (torch.float32,)  # Numba has no bfloat16, and no float16 arithmetic


@functools.cache
def _triton():
    try:
        from orbitflow_kernels import triton_kernel
    except Exception:  # Triton not installed, or installed without a usable backend
        return None
    return triton_kernel


def _check(q: torch.Tensor, pool: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
           rows: torch.Tensor | None) -> None:
    if pool.dim() != 5 or q.dim() != 3 or q.shape[2] != pool.shape[4] or q.shape[1] % pool.shape[2]:
        raise ValueError(f"q must be [R, H, D] and pool [num_blocks, 2, Hkv, bs, D] with H a multiple of "
                         f"Hkv, got {tuple(q.shape)} and {tuple(pool.shape)}")
    n = q.shape[0] if rows is None else rows.numel()
    if seq_lens.numel() != q.shape[0] or n != q.shape[0] or block_table.dim() != 2:
        raise ValueError(f"{q.shape[0]} queries, {seq_lens.numel()} seq_lens, {n} table rows; "
                         f"block_table must be 2-D, got {tuple(block_table.shape)}")


# What a decode task's `bad` entry says, in the Numba and C++ kernels (0: nothing wrong).
_BAD_BLOCK, _NO_KEY, _OFF_TABLE, _NO_MEMORY = 1, 2, 3, 4


def raise_for_bad_tasks(bad: np.ndarray, lens: torch.Tensor, rows: torch.Tensor | None, table: torch.Tensor,
                        pool: torch.Tensor) -> None:
    """Raise what a compiled decode kernel found wrong, from its per-(sequence, KV head) codes
    `bad` [R * Hkv]: the kernels check each row as they walk it, so there is no host pass a layer."""
    if not bad.any():
        return
    if (bad == _NO_KEY).any():
        raise ValueError(f"every decode query attends to at least its own key: seq_lens {lens.tolist()}")
    if (bad == _OFF_TABLE).any():
        if int(lens.max()) > table.shape[1] * pool.shape[3]:
            raise ValueError(f"seq_lens up to {int(lens.max())} need more blocks than the table's "
                             f"{table.shape[1]} columns of {pool.shape[3]} tokens")
        rows = torch.arange(lens.numel()) if rows is None else rows
        raise ValueError(f"table rows {rows.tolist()} outside the block table's {table.shape[0]}")
    if (bad == _NO_MEMORY).any():
        raise MemoryError("no memory for a decode task's scores")
    seqs = sorted({int(t) // pool.shape[2] for t in np.flatnonzero(bad)})
    raise ValueError(f"block table rows of sequences {seqs} name blocks outside the pool's {pool.shape[0]}")


def paged_decode_attention(q: torch.Tensor, pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, rows: torch.Tensor | None = None, *,
                           impl: str = "auto", tile_blocks: int = 32) -> torch.Tensor:
    """Attention of one query per sequence over its paged keys: [R, H, D] in q's dtype.

    q [R, H, D]; pool [num_blocks, 2, Hkv, bs, D] (0 = K, 1 = V); block_table [T, W] int64, where
    sequence r's j-th block is `block_table[rows[r], j]` (rows defaults to 0..R-1); seq_lens [R]:
    keys of sequence r (>= 1; its row must hold cdiv(seq_lens[r], bs) valid block ids, later
    entries are never read). Query head h reads KV head h // (H // Hkv), as transformers' GQA.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check(q, pool, block_table, seq_lens, rows)
    if q.shape[0] == 0:
        return q.new_zeros(q.shape)
    lens = seq_lens.to(device=pool.device, dtype=torch.int64)
    table = block_table.to(pool.device)
    if rows is not None:
        rows = rows.to(device=pool.device, dtype=torch.int64)
    if impl == "cpp" or (impl == "auto" and not pool.is_cuda and pool.dtype in _NUMBA_DTYPES
                         and cpu_kernels.preferred()):
        out = cpu_kernels.paged_decode(q, pool, table, lens, scale, rows)  # None: not for this pool
        if out is not None:
            return out
        if impl == "cpp":
            raise ValueError(f"impl='cpp' takes a CPU fp32 pool, head_dim in {cpu_kernels.HEAD_DIMS} and at most "
                             f"{cpu_kernels.MAX_GROUP} query heads per KV head, and a built library "
                             f"(cpu_kernels.available(): {cpu_kernels.available()}); got a {pool.device} "
                             f"{pool.dtype} pool, q {tuple(q.shape)}")
    if impl == "numba" or (impl == "auto" and not pool.is_cuda and pool.dtype in _NUMBA_DTYPES):
        if pool.is_cuda or pool.dtype not in _NUMBA_DTYPES:
            raise ValueError(f"impl='numba' takes a CPU pool of {_NUMBA_DTYPES}, got a {pool.device} "
                             f"{pool.dtype} pool")
        from orbitflow_kernels import numba_kernel
        return numba_kernel.paged_decode(q, pool, table, lens, scale, rows)
    if impl == "triton" or (impl == "auto" and pool.is_cuda and _triton() is not None):
        kernel = _triton()
        if kernel is None:
            raise RuntimeError("impl='triton' needs the triton package")
        return kernel.paged_decode(q, pool, table, lens, scale, rows)
    return _torch_paged_decode(q, pool, table, lens, scale, rows, tile_blocks)


def _torch_paged_decode(q: torch.Tensor, pool: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
                        scale: float, rows: torch.Tensor | None, tile_blocks: int) -> torch.Tensor:
    r, h, d = q.shape
    nb, _, hkv, bs, _ = pool.shape
    g = h // hkv
    qf = q.to(torch.float32).view(r, hkv, g, d)
    m = torch.full((r, hkv, g), float("-inf"), device=q.device)
    denom = torch.zeros(r, hkv, g, device=q.device)
    acc = torch.zeros(r, hkv, g, d, device=q.device)
    width = int((lens.max() + bs - 1) // bs)
    t = tile_blocks * bs
    cols = torch.arange(tile_blocks, device=q.device)
    for j0 in range(0, width, tile_blocks):
        # Every tile is full width (columns past the table are masked): a sequence's result is the
        # same bits whatever the batch around it, which sets how many tiles run.
        j = (j0 + cols).clamp(max=table.shape[1] - 1)
        ids = table[:, j] if rows is None else table[rows[:, None], j[None, :]]
        kv = pool[ids.clamp(0, nb - 1)]  # [R, C, 2, Hkv, bs, D]: this tile of every sequence
        k = kv[:, :, 0].permute(0, 2, 1, 3, 4).reshape(r, hkv, t, d).to(torch.float32)
        v = kv[:, :, 1].permute(0, 2, 1, 3, 4).reshape(r, hkv, t, d).to(torch.float32)
        s = torch.matmul(qf, k.transpose(-1, -2)) * scale  # [R, Hkv, G, T]
        pos = j0 * bs + torch.arange(t, device=q.device)
        s.masked_fill_((pos[None, :] >= lens[:, None])[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # a tile past the end
        p = torch.exp(s - safe[..., None])
        corr = torch.exp(m - safe)
        denom = denom * corr + p.sum(-1)
        acc = acc * corr[..., None] + torch.matmul(p, v)
        m = m_new
    return (acc / denom[..., None]).reshape(r, h, d).to(q.dtype)


def chunk_attention_cpu(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx: int,
                        scale: float) -> torch.Tensor:
    """Causal attention of a prefill chunk after `ctx` cached tokens, on the CPU: [1, H, n, D].

    q [1, H, n, D] (the chunk's queries, at positions ctx..ctx+n-1); keys/values [1, Hkv, ctx + n, D]
    (H a multiple of Hkv, GQA). Two calls of torch's CPU flash kernel, the queries over the cached
    context (no mask) and over the chunk's own keys (causal), merged by their log-sum-exps (the
    split-KV merge of flash-decoding, Dao et al. 2023), in fp32. One SDPA call with an explicit
    [n, ctx + n] mask runs the kernel's masked path, 17-35 % slower at n = 1,024 over 1-6K keys on
    this project's 2-core box (bench/README.md).
    """
    if not 0 < ctx < keys.shape[2] or keys.shape[2] - ctx != q.shape[2]:
        raise ValueError(f"need 0 < ctx and ctx + n keys: ctx={ctx}, {q.shape[2]} queries, {keys.shape[2]} keys")
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    o1, l1 = flash(q, keys[:, :, :ctx], values[:, :, :ctx], scale=scale)
    o2, l2 = flash(q, keys[:, :, ctx:], values[:, :, ctx:], is_causal=True, scale=scale)
    top = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - top).unsqueeze(-1), torch.exp(l2 - top).unsqueeze(-1)
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q.dtype)
