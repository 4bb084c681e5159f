"""Batched decode attention over a paged KV pool (kernels/orbitflow_kernels/attention.py) against
per-sequence SDPA on gathered K/V: GQA, ragged lengths (one token, a block boundary, tiles past a
short sequence's end), table rows picked through `rows`, fp32 and bf16; the CPU's compiled (Numba)
kernel, batch invariance; the Triton kernel under
Triton's CPU interpreter where Triton is installed, and on CUDA where there is a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from orbitflow_kernels.attention import chunk_attention_cpu, paged_decode_attention
from orbitflow_kernels.gather import gather_kv

BS, HKV, G, D = 4, 2, 3, 8
LENS = [1, 4, 5, 13, 40]


def _case(dtype: torch.dtype, device: str = "cpu", seed: int = 0, d: int = D):
    gen = torch.Generator().manual_seed(seed)
    nb = 64
    pool = torch.randn(nb, 2, HKV, BS, d, generator=gen).to(dtype)
    perm = torch.randperm(nb, generator=gen)
    width = 16
    table = torch.full((len(LENS) + 2, width), 10_000, dtype=torch.int64)  # unread entries: junk
    rows = torch.tensor([3, 0, 6, 1, 4])  # sequence r's row in the table
    used = 0
    for r, n in enumerate(LENS):
        k = -(-n // BS)
        table[rows[r], :k] = perm[used:used + k]
        used += k
    q = torch.randn(len(LENS), HKV * G, d, generator=gen).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return to(q), to(pool), to(table), to(torch.tensor(LENS)), to(rows)


def _reference(q, pool, table, lens, rows, scale):
    outs = []
    for r, n in enumerate(lens.tolist()):
        kv = gather_kv(pool, table[rows[r], :-(-n // BS)], n, impl="torch").float()
        o = F.scaled_dot_product_attention(q[r][None, :, None].float(), kv[0:1], kv[1:2], scale=scale,
                                           enable_gqa=True)  # [1, H, 1, D]
        outs.append(o[0, :, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile_blocks", [1, 3, 64])
def test_torch_paged_decode_matches_sdpa(dtype, tile_blocks):
    q, pool, table, lens, rows = _case(dtype)
    got = paged_decode_attention(q, pool, table, lens, 0.3, rows, impl="torch", tile_blocks=tile_blocks)
    want = _reference(q, pool, table, lens, rows, 0.3)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


# The compiled CPU kernels; the C++ one is built for head_dim 64 and 128 (cpu_kernels.HEAD_DIMS).
COMPILED = [("numba", D), ("cpp", 64)]


@pytest.mark.parametrize("impl, d", COMPILED + [("numba", 64)])
def test_compiled_paged_decode_matches_sdpa(impl, d):
    q, pool, table, lens, rows = _case(torch.float32, d=d)
    got = paged_decode_attention(q, pool, table, lens, 0.3, rows, impl=impl)
    want = _reference(q, pool, table, lens, rows, 0.3)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl, d", [("torch", D)] + COMPILED)
def test_a_sequence_gets_the_same_bits_in_any_batch(impl, d):
    """Batch invariance, which the pressure-identity tests build on: each sequence alone, and the
    batch in reverse order, give exactly the batch's rows (the CPU default, cpp, included)."""
    q, pool, table, lens, rows = _case(torch.float32, d=d)
    whole = paged_decode_attention(q, pool, table, lens, 0.3, rows, impl=impl)
    for r in range(len(LENS)):
        alone = paged_decode_attention(q[r:r + 1], pool, table, lens[r:r + 1], 0.3, rows[r:r + 1], impl=impl)
        assert torch.equal(alone[0], whole[r]), r
    rev = torch.arange(len(LENS) - 1, -1, -1)
    assert torch.equal(paged_decode_attention(q[rev], pool, table, lens[rev], 0.3, rows[rev], impl=impl), whole[rev])


def test_numba_warm_up_compiles_the_signature_decoding_uses():
    """`make install` runs `numba_kernel.warm_up()` so a fresh clone's first decode does not pay the
    compile: it must compile the very signature a decode through `paged_decode_attention` uses
    (fp32 q and pool, int64 table and lengths, table rows given or not), or the cache misses."""
    from orbitflow_kernels import numba_kernel
    numba_kernel.warm_up()
    warmed = set(numba_kernel._paged_decode.signatures)
    q, pool, table, lens, rows = _case(torch.float32)
    lens = lens.to(torch.int32)  # the caller casts the lengths (and rows) to int64
    paged_decode_attention(q, pool, table, lens, 0.3, rows.to(torch.int32), impl="numba")
    paged_decode_attention(q, pool, table[rows], lens, 0.3, None, impl="numba")
    assert set(numba_kernel._paged_decode.signatures) == warmed and len(warmed) == 1, \
        numba_kernel._paged_decode.signatures


@pytest.mark.parametrize("hkv, g, d", [(2, 1, 64), (1, 8, 128), (2, 4, 128)])
def test_cpp_paged_decode_over_its_group_sizes_and_head_dims(hkv, g, d):
    """Other instantiations of the C++ kernel than SmolLM2's (3 query heads per KV head, 64 dims):
    1 and 8 query heads per KV head, 128 dims; an int32 table, lengths and rows give the same bits."""
    gen = torch.Generator().manual_seed(g * d)
    lens = torch.tensor([1, 16, 17, 300])
    width = -(-300 // BS)
    nb = len(lens) * width
    pool = torch.randn(nb, 2, hkv, BS, d, generator=gen)
    table = torch.randperm(nb, generator=gen).view(len(lens), width).contiguous()
    q = torch.randn(len(lens), hkv * g, d, generator=gen)
    rows = torch.tensor([2, 0, 3, 1])
    got = paged_decode_attention(q, pool, table, lens, d ** -0.5, rows, impl="cpp")
    torch.testing.assert_close(got, _reference(q, pool, table, lens, rows, d ** -0.5), rtol=1e-5, atol=1e-5)
    assert torch.equal(paged_decode_attention(q, pool, table.to(torch.int32), lens.to(torch.int32), d ** -0.5,
                                              rows.to(torch.int32), impl="cpp"), got)


@pytest.mark.parametrize("impl, d", COMPILED)
def test_compiled_kernels_refuse_a_block_id_outside_the_pool(impl, d):
    q, pool, table, lens, rows = _case(torch.float32, d=d)
    table[rows[2], 1] = pool.shape[0]  # sequence 2 (5 keys, 2 blocks): its second block
    with pytest.raises(ValueError, match=r"sequences \[2\]"):
        paged_decode_attention(q, pool, table, lens, 0.3, rows, impl=impl)
    table[rows[2], 1] = -1
    with pytest.raises(ValueError, match=r"sequences \[2\]"):
        paged_decode_attention(q, pool, table, lens, 0.3, rows, impl=impl)


@pytest.mark.parametrize("impl, d", COMPILED)
@pytest.mark.parametrize("q_scale, tol", [(1.0, 1e-5), (20.0, 1e-4)])
def test_compiled_paged_decode_over_long_rows_matches_sdpa_and_is_batch_invariant(impl, d, q_scale, tol):
    """Rows of up to 2,000 keys: with plain queries the softmax spreads over thousands of keys (its
    sum and normalisation matter); with queries scaled by 20 the scores spread over about +-90 and
    the polynomial exp (`numba_kernel._exp_neg`) runs far from the row's max, where it saturates at
    2^-126. Both close to SDPA, and each sequence alone gives its batch row's bits."""
    gen = torch.Generator().manual_seed(7)
    lens = torch.tensor([2000, 1999, 17, 1])
    width = -(-2000 // BS)
    pool = torch.randn(len(lens) * width, 2, HKV, BS, d, generator=gen)
    table = torch.randperm(len(lens) * width, generator=gen).view(len(lens), width).contiguous()
    q = torch.randn(len(lens), HKV * G, d, generator=gen) * q_scale * (D / d) ** 0.5  # same score spread
    rows = torch.arange(len(lens))
    got = paged_decode_attention(q, pool, table, lens, 0.3, rows, impl=impl)
    torch.testing.assert_close(got, _reference(q, pool, table, lens, rows, 0.3), rtol=tol, atol=tol)
    for r in range(len(lens)):
        alone = paged_decode_attention(q[r:r + 1], pool, table, lens[r:r + 1], 0.3, rows[r:r + 1], impl=impl)
        assert torch.equal(alone[0], got[r]), r


@pytest.mark.parametrize("impl, d", COMPILED)
def test_compiled_kernels_refuse_lengths_and_rows_the_table_cannot_hold(impl, d):
    q, pool, table, lens, rows = _case(torch.float32, d=d)
    with pytest.raises(ValueError, match="at least its own key"):
        paged_decode_attention(q, pool, table, lens.clone().fill_(0), 0.3, rows, impl=impl)
    longer = lens.clone()
    longer[1] = table.shape[1] * BS + 1
    with pytest.raises(ValueError, match="more blocks than the table's 16 columns"):
        paged_decode_attention(q, pool, table, longer, 0.3, rows, impl=impl)
    with pytest.raises(ValueError, match="outside the block table's 7"):
        paged_decode_attention(q, pool, table, lens, 0.3, rows + 3, impl=impl)


def test_auto_takes_cpp_with_avx512_then_numba_on_a_cpu_fp32_pool_and_torch_for_bf16():
    from orbitflow_kernels import cpu_kernels
    q, pool, table, lens, rows = _case(torch.float32, d=64)
    native = "cpp" if cpu_kernels.preferred() else "numba"  # the C++ kernels are slow without AVX-512
    assert torch.equal(paged_decode_attention(q, pool, table, lens, 0.3, rows),
                       paged_decode_attention(q, pool, table, lens, 0.3, rows, impl=native))
    q8, pool8, *_ = _case(torch.float32)  # head_dim 8: the C++ kernel is not built for it
    assert torch.equal(paged_decode_attention(q8, pool8, table, lens, 0.3, rows),
                       paged_decode_attention(q8, pool8, table, lens, 0.3, rows, impl="numba"))
    with pytest.raises(ValueError, match="impl='cpp' takes"):
        paged_decode_attention(q8, pool8, table, lens, 0.3, rows, impl="cpp")
    qb, poolb, *_ = _case(torch.bfloat16)
    with pytest.raises(ValueError, match="numba"):
        paged_decode_attention(qb, poolb, table, lens, 0.3, rows, impl="numba")
    with pytest.raises(ValueError, match="impl='cpp' takes"):
        paged_decode_attention(qb, poolb, table, lens, 0.3, rows, impl="cpp")
    torch.testing.assert_close(paged_decode_attention(qb, poolb, table, lens, 0.3, rows),  # auto: torch
                               paged_decode_attention(qb, poolb, table, lens, 0.3, rows, impl="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ctx, n", [(1, 1), (1, 7), (16, 5), (37, 40)])
def test_chunk_attention_after_context_matches_masked_sdpa(dtype, ctx, n):
    gen = torch.Generator().manual_seed(ctx * 100 + n)
    q = torch.randn(1, HKV * G, n, D, generator=gen).to(dtype)
    k, v = (torch.randn(1, HKV, ctx + n, D, generator=gen).to(dtype) for _ in range(2))
    mask = torch.arange(ctx + n)[None, :] <= torch.arange(ctx, ctx + n)[:, None]  # query i sees keys <= ctx + i
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3,
                                          enable_gqa=True)
    got = chunk_attention_cpu(q, k, v, ctx, 0.3)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="ctx"):
        chunk_attention_cpu(q, k, v, 0, 0.3)


def test_rows_default_to_the_table_order_and_bad_shapes_are_refused():
    q, pool, table, lens, rows = _case(torch.float32)
    got = paged_decode_attention(q, pool, table[rows], lens, 0.3, impl="torch")
    torch.testing.assert_close(got, paged_decode_attention(q, pool, table, lens, 0.3, rows, impl="torch"))
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q, pool, table, lens[:2], 0.3, rows)
    with pytest.raises(ValueError, match="multiple of"):
        paged_decode_attention(q[:, :5], pool, table, lens, 0.3, rows)


_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not _TRITON or torch.cuda.is_available(),
                    reason="needs triton; on a GPU the compiled kernel is tested instead")
def test_triton_kernel_in_the_interpreter_matches_sdpa():
    """The kernel's indexing and split merge, line by line on the CPU (TRITON_INTERPRET=1 has to
    be set before Triton is imported: a subprocess). Where a GPU is present the compiled kernel is
    tested (below): Triton 3.6's interpreter there fails on the kernel's tensor loop bounds
    (`range(b0, b1)`), which its compiler takes (gpu_check on an H200, 2026-11-29)."""
    code = ("import torch, test_attention as t\n"
            "for dtype in (torch.float32, torch.bfloat16):\n"
            "    q, pool, table, lens, rows = t._case(dtype)\n"
            "    got = t.paged_decode_attention(q, pool, table, lens, 0.3, rows, impl='triton')\n"
            "    want = t._reference(q, pool, table, lens, rows, 0.3)\n"
            "    tol = 1e-5 if dtype == torch.float32 else 2e-2\n"
            "    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)\n"
            "print('ok')\n")
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parent / "kernels"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@pytest.mark.skipif(not (_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_cuda_matches_sdpa(dtype):
    q, pool, table, lens, rows = _case(dtype, "cuda")
    got = paged_decode_attention(q, pool, table, lens, 0.3, rows, impl="triton")
    want = _reference(q, pool, table, lens, rows, 0.3)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
