"""Paged decode attention on the CPU as one compiled loop (Numba), reading the pool in place.

One task per (sequence, KV head), all query heads of that KV head together (GQA), as vLLM's CPU
paged-attention kernel splits the work; the task walks its sequence's blocks through the
block-table row twice: first scoring every key (fp32 dot products), then, after one softmax over
the whole row, summing the values by those weights. The scores of one task ([G, context] floats)
sit in a scratch row; the two passes replace an online softmax that rescaled its running output
after every 16-token block and called libm's exp per score: 2.1-2.5 ms a layer at 16 x 1,000
tokens against 1.0-1.7 ms now on the Zen 5 box of bench/README.md (stop 36). exp is `_exp_neg`,
a range reduction and a degree-7 polynomial that vectorises (relative error ~1e-7 near the row's
max, growing to ~4e-6 for scores 87 below it, where the weight is under 1e-37; a score more than
~87 below the max weighs 2^-126, not 0). Nothing is gathered or padded: the bytes read are the
sequence's own KV, once (keys in the first pass, values in the second).
A task's arithmetic depends only on its own sequence (not on the batch around it, nor on the
thread count), so a sequence's output has the same bits in any batch, as the pressure-identity
tests need.

Compiled on first use (a few seconds; cached on disk beside this file where it is writable).
fp32 pools only (Numba has no bfloat16 and no float16 arithmetic): others take the torch loop.
"""

from __future__ import annotations

import os

import numpy as np
import torch

# Numba sizes its thread pool from NUMBA_NUM_THREADS (default: every CPU) when it is imported. Unless
# the user set it, size it from torch's intra-op setting as this module is first imported (lazily,
# by the first decode), then unset it again so processes started later (Ray actors) size their own:
# a shard actor with one thread must not carry an idle pool that competes with the other shards
# for two cores (3 shards on 2 cores ran 3.7x slower).
_ours = "NUMBA_NUM_THREADS" not in os.environ
if _ours:
    os.environ["NUMBA_NUM_THREADS"] = str(torch.get_num_threads())
try:
    from numba import config, get_num_threads, njit, prange, set_num_threads  # noqa: E402
finally:
    if _ours:
        del os.environ["NUMBA_NUM_THREADS"]

# The pool's size as Numba fixed it when first imported (by this module or before it, e.g. by the
# planner): `set_num_threads` accepts no more. `config.NUMBA_NUM_THREADS` is not it: Numba re-reads
# the environment on every compile.
from numba.np.ufunc.parallel import NUM_THREADS as _POOL_THREADS  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

# What a task's `bad` entry says (0: nothing wrong; the caller raises on any other): as the C++ kernel's.
from orbitflow_kernels.attention import _BAD_BLOCK, _NO_KEY, _OFF_TABLE, raise_for_bad_tasks  # noqa: E402

# Engine threads (tensor-parallel shards in one process, the serving core's engine thread) may run the
# kernel at once: only the OpenMP and TBB layers take concurrent launches (workqueue aborts on them).
if config.THREADING_LAYER == "default":
    config.THREADING_LAYER = "threadsafe"


def run(kernel, *args):
    """kernel(*args) for a compiled kernel of this package. Numba re-reads NUMBA_NUM_THREADS on every
    compile and refuses a size other than the running pool's: where the pool is not the default size
    (torch's threads at import, e.g. 1 in a Ray actor) and the variable is unset again (see above), a
    kernel compiled after any kernel launched the pool (a cold cache, a new signature) fails. Its
    compile then runs again with the variable set to the size Numba holds (once per signature)."""
    try:
        return kernel(*args)
    except RuntimeError as exc:
        if "NUMBA_NUM_THREADS" not in str(exc) or "NUMBA_NUM_THREADS" in os.environ:
            raise
    os.environ["NUMBA_NUM_THREADS"] = str(config.NUMBA_NUM_THREADS)
    try:
        return kernel(*args)
    finally:
        del os.environ["NUMBA_NUM_THREADS"]


def use_torch_threads() -> None:
    """Run this thread's next kernel launches on torch's intra-op thread count, up to the pool's size."""
    threads = min(torch.get_num_threads(), _POOL_THREADS)
    if get_num_threads() != threads:
        set_num_threads(threads)


_F1 = np.float32(1.0)
_LOG2E, _LN2 = np.float32(1.4426950408889634), np.float32(0.6931471805599453)
_EXP_MAX = np.float32(126.0)  # |t| bound in exp(x) = 2^t: 2^k stays a normal float32


@intrinsic
def _f32_from_bits(typingctx, bits):  # pragma: no cover - compiled
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always", nogil=True)
def _exp_neg(g):  # pragma: no cover - compiled
    # exp(-g) = 2^k * 2^(t - k) with t = -g log2(e), k the nearest integer (|t - k| <= 1/2): 2^k from
    # the exponent bits, 2^(t - k) = exp(f), f = (t - k) ln 2, a degree-7 Taylor polynomial
    # (truncation < 6e-9). Relative error ~1e-7 for g in [0, 1], growing with g (rounding of t): up
    # to ~5e-7 at 10 and ~4e-6 at 87; above ~87 (and for g = +inf) it saturates at 2^-126, not 0.
    # Inlined by numba_elementwise's SwiGLU too: Numba's disk cache checks only the caller's own
    # file, so after editing this function delete orbitflow_kernels/__pycache__/*.nbi and *.nbc.
    t = min(max(-g * _LOG2E, -_EXP_MAX), _EXP_MAX)
    k = np.floor(t + np.float32(0.5))
    f = (t - k) * _LN2
    p = np.float32(1.0 / 5040.0)
    p = p * f + np.float32(1.0 / 720.0)
    p = p * f + np.float32(1.0 / 120.0)
    p = p * f + np.float32(1.0 / 24.0)
    p = p * f + np.float32(1.0 / 6.0)
    p = p * f + np.float32(0.5)
    p = p * f + _F1
    p = p * f + _F1
    return p * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


# fastmath limited to reassociation and FMA contraction (vectorised dot products and sums).
@njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)
def _paged_decode(q, pool, table, rows, lens, scale, out, bad):  # pragma: no cover - compiled
    # q [R, H, D] fp32; pool [NB, 2, Hkv, bs, D]; table [T, W] int64; rows [R]; lens [R]; out [R, H, D];
    # bad [R * Hkv]: set where the task cannot run (that task reads nothing; the caller raises): a
    # length under 1 (_NO_KEY), a table row or length past the table (_OFF_TABLE), a block id outside
    # the pool (_BAD_BLOCK). Numba does not bounds-check: these checks are all there is.
    r_n, h_n, d_n = q.shape
    nb, hkv_n, bs = pool.shape[0], pool.shape[2], pool.shape[3]
    g_n = h_n // hkv_n
    for task in prange(r_n * hkv_n):
        r = task // hkv_n
        kh = task % hkv_n
        row = rows[r]
        n = lens[r]
        n_blocks = (n + bs - 1) // bs
        if n < 1:
            bad[task] = _NO_KEY
            continue
        if row < 0 or row >= table.shape[0] or n_blocks > table.shape[1]:
            bad[task] = _OFF_TABLE
            continue
        for j in range(n_blocks):
            b = table[row, j]
            if b < 0 or b >= nb:
                bad[task] = _BAD_BLOCK
        if bad[task]:
            continue
        qh = np.empty((g_n, d_n), dtype=np.float32)
        for g in range(g_n):
            for d in range(d_n):
                qh[g, d] = q[r, kh * g_n + g, d] * scale
        # pass 1: the scores of every key, block by block through the table row
        s = np.empty((g_n, n), dtype=np.float32)
        for j in range(n_blocks):
            b = table[row, j]
            base = j * bs
            for g in range(g_n):
                for t in range(min(bs, n - base)):
                    x = np.float32(0.0)
                    for d in range(d_n):
                        x += qh[g, d] * pool[b, 0, kh, t, d]
                    s[g, base + t] = x
        # softmax over the whole row (exp by `_exp_neg`'s vectorised polynomial)
        for g in range(g_n):
            top = s[g, 0]
            for t in range(1, n):
                top = max(top, s[g, t])
            den = np.float32(0.0)
            for t in range(n):
                p = _exp_neg(top - s[g, t])
                s[g, t] = p
                den += p
            inv = _F1 / den
            for t in range(n):
                s[g, t] *= inv
        # pass 2: the weighted sum of the values
        acc = np.zeros((g_n, d_n), dtype=np.float32)
        for j in range(n_blocks):
            b = table[row, j]
            base = j * bs
            for g in range(g_n):
                for t in range(min(bs, n - base)):
                    p = s[g, base + t]
                    for d in range(d_n):
                        acc[g, d] += p * pool[b, 1, kh, t, d]
        for g in range(g_n):
            for d in range(d_n):
                out[r, kh * g_n + g, d] = acc[g, d]


def paged_decode(q: torch.Tensor, pool: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, scale: float,
                 rows: torch.Tensor | None) -> torch.Tensor:
    """attention.paged_decode_attention's contract on CPU tensors (checked by the caller)."""
    r = q.shape[0]
    rows = torch.arange(r) if rows is None else rows
    qf = q.detach().to(torch.float32).contiguous()
    out = torch.empty(qf.shape, dtype=torch.float32)
    use_torch_threads()
    bad = np.zeros(r * pool.shape[2], dtype=np.uint8)
    run(_paged_decode, qf.numpy(), pool.detach().numpy(), table.contiguous().numpy(), rows.contiguous().numpy(),
        lens.contiguous().numpy(), np.float32(scale), out.numpy(), bad)
    raise_for_bad_tasks(bad, lens, rows, table, pool)  # checked inside the kernel, which walks each row anyway
    return out.to(q.dtype)


def warm_up() -> None:
    """Compile (or load from the cache) the decode kernel for the types the engine hands it (fp32
    queries and pool, int64 table, rows and lengths), so a fresh install's first decode does not
    pay the compile (several seconds on a small machine)."""
    pool = torch.zeros(2, 2, 1, 4, 8)
    paged_decode(torch.zeros(1, 2, 8), pool, torch.zeros(1, 1, dtype=torch.int64),
                 torch.ones(1, dtype=torch.int64), 1.0, None)
