"""The CPU prefill attention kernel (kernels/orbitflow_kernels/cpu_prefill.py) against a float64
masked-softmax reference: with and without cached context, GQA groups 1-8, head_dim 64 and 128,
chunks that are not a multiple of the kernel's tiles; a row's bits do not depend on how its prompt
was chunked nor on the thread count; strided inputs and outputs as the runner passes them; the
torch fallback; errors, and a missing compiler."""

from __future__ import annotations

import pytest
import torch

from orbitflow_kernels import cpu_kernels
from orbitflow_kernels.cpu_prefill import prefill_attention


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 causal attention, q [n, H, D] at positions s - n .. s - 1 over k, v [Hkv, s, D]."""
    n, h, _ = q.shape
    s, g = k.shape[1], h // k.shape[0]
    kk, vv = k.double().repeat_interleave(g, 0), v.double().repeat_interleave(g, 0)  # [H, s, D]
    scores = torch.einsum("nhd,hsd->hns", q.double(), kk) * scale
    mask = torch.arange(s)[None, :] <= torch.arange(s - n, s)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hns,hsd->nhd", scores.softmax(-1), vv)


def _case(n: int, ctx: int, h: int, hkv: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, d, generator=gen)
    k, v = (torch.randn(hkv, ctx + n, d, generator=gen) for _ in range(2))
    return q, k, v


def test_the_kernel_builds_here_and_auto_takes_it_with_avx512():
    assert cpu_kernels.available(), "g++ is on every machine this project runs on (and on CI)"
    assert cpu_kernels.library_path().exists()
    avx512 = "avx512f" in cpu_kernels._cpu_flags().split()
    assert (cpu_kernels.vector_bits() == 512) == avx512
    assert cpu_kernels.preferred() == avx512


@pytest.mark.parametrize("n, ctx", [(1, 0), (5, 0), (16, 0), (17, 0), (130, 0), (1, 70), (7, 64), (100, 37),
                                    (64, 200)])
@pytest.mark.parametrize("h, hkv, d", [(9, 3, 64), (4, 4, 64), (8, 1, 128), (8, 2, 128)])
def test_cpp_matches_the_float64_reference(n, ctx, h, hkv, d):
    q, k, v = _case(n, ctx, h, hkv, d, seed=n + ctx + h)
    want = _reference(q, k, v, 0.125)
    got = prefill_attention(q, k, v, 0.125, impl="cpp")
    assert got.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefill_attention(q, k, v, 0.125, impl="torch").double(), want,
                               rtol=1e-5, atol=1e-5)


def test_large_scores_are_as_accurate_as_torchs_kernel():
    """Scores tens to hundreds apart (rows dominated by a few keys, the others' weights underflow):
    fp32 rounding of the scores themselves is ~1e-5 there, for torch's flash kernel as for ours."""
    q, k, v = _case(40, 30, 9, 3, 64, seed=5)
    want = _reference(q * 30, k, v, 0.125)
    err = {impl: (prefill_attention(q * 30, k, v, 0.125, impl=impl).double() - want).abs().max().item()
           for impl in ("cpp", "torch")}
    assert err["cpp"] <= 1.5 * err["torch"] and err["cpp"] < 1e-4, err


@pytest.mark.parametrize("h, hkv", [(9, 3), (8, 2)])
def test_a_rows_bits_do_not_depend_on_chunking_or_threads(h, hkv):
    """The rows of one 300-token prompt, attended at once and as chunks of 77, 128 and 95 after the
    cached context, and with 1 thread against 2: identical bits (at 4 query heads per KV head the
    kernel's register blocks of 6 rows straddle heads and pad the tile's last block)."""
    q, k, v = _case(300, 0, h, hkv, 64, seed=11)
    whole = prefill_attention(q, k, v, 0.125, impl="cpp")
    parts, lo = [], 0
    for size in (77, 128, 95):
        hi = lo + size
        parts.append(prefill_attention(q[lo:hi], k[:, :hi], v[:, :hi], 0.125, impl="cpp"))
        lo = hi
    assert torch.equal(torch.cat(parts), whole)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(prefill_attention(q, k, v, 0.125, impl="cpp"), whole)
    finally:
        torch.set_num_threads(threads)


def test_strided_inputs_and_an_output_view_as_the_runner_passes_them():
    """keys/values as the [Hkv, n, D] transpose of the new tokens' [n, Hkv, D] (no cached context), q
    a slice of a wider projection, out a slice of the layer's [T, H * D] output."""
    n, h, hkv, d = 50, 9, 3, 64
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(n + 10, (h + 2 * hkv) * d, generator=gen)
    q = qkv[5:5 + n, :h * d].view(n, h, d)
    k = qkv[5:5 + n, h * d:(h + hkv) * d].reshape(n, hkv, d).transpose(0, 1)
    v = qkv[5:5 + n, (h + hkv) * d:].reshape(n, hkv, d).transpose(0, 1)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = torch.full((n + 10, h * d), 7.0)
    got = prefill_attention(q, k, v, 0.125, out=out[5:5 + n].view(n, h, d), impl="cpp")
    torch.testing.assert_close(got.double(), _reference(q, k, v, 0.125), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[5:5 + n].view(n, h, d), got)
    native = "cpp" if cpu_kernels.preferred() else "torch"  # the kernel is slow without AVX-512
    assert torch.equal(prefill_attention(q, k, v, 0.125), prefill_attention(q, k, v, 0.125, impl=native))
    assert (out[:5] == 7).all() and (out[5 + n:] == 7).all()


def test_auto_falls_back_to_torch_where_the_kernel_does_not_fit():
    q, k, v = _case(20, 5, 4, 2, 16, seed=1)  # head_dim 16: not compiled
    torch.testing.assert_close(prefill_attention(q, k, v, 0.25).double(), _reference(q, k, v, 0.25),
                               rtol=1e-5, atol=1e-5)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    got = prefill_attention(qb, kb, vb, 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), _reference(qb, kb, vb, 0.25), rtol=2e-2, atol=2e-2)


def test_bad_calls_are_refused():
    q, k, v = _case(8, 4, 9, 3, 64)
    with pytest.raises(ValueError, match="impl must be one of"):
        prefill_attention(q, k, v, 0.1, impl="flash")
    with pytest.raises(ValueError, match="multiple of Hkv"):
        prefill_attention(q[:, :8], k, v, 0.1)
    with pytest.raises(ValueError, match="ctx \\+ n"):
        prefill_attention(q, k[:, :5], v[:, :5], 0.1)
    with pytest.raises(ValueError, match="cpp prefill kernel takes fp32"):
        prefill_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.1, impl="cpp")
    with pytest.raises(ValueError, match="out must be"):
        prefill_attention(q, k, v, 0.1, out=torch.empty(8, 9 * 64))


def test_build_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "library_path", lambda: tmp_path / "orbitflow_cpu_kernels-x.so")
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_kernels.build()
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(RuntimeError, match="failed"):
        cpu_kernels.build()
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


def test_without_avx512_auto_takes_the_fallbacks(monkeypatch):
    """Built for 256-bit vectors the kernels are slower than SDPA and Numba: "auto" takes those."""
    from orbitflow_kernels.attention import paged_decode_attention
    monkeypatch.setattr(cpu_kernels, "vector_bits", lambda: 256)
    cpu_kernels.preferred.cache_clear()
    try:
        assert not cpu_kernels.preferred()
        q, k, v = _case(40, 20, 9, 3, 64, seed=2)
        assert torch.equal(prefill_attention(q, k, v, 0.125), prefill_attention(q, k, v, 0.125, impl="torch"))
        gen = torch.Generator().manual_seed(4)
        pool = torch.randn(12, 2, 3, 16, 64, generator=gen)
        table = torch.arange(12).view(3, 4)
        lens, qd = torch.tensor([5, 64, 33]), torch.randn(3, 9, 64, generator=gen)
        assert torch.equal(paged_decode_attention(qd, pool, table, lens, 0.125),
                           paged_decode_attention(qd, pool, table, lens, 0.125, impl="numba"))
    finally:
        monkeypatch.undo()
        cpu_kernels.preferred.cache_clear()
