"""The layer math's building blocks against the expressions they replace: our RMSNorm (its last
multiply in place) equals transformers' bit for bit; oneDNN-packed linears (model/linear.py) are
close to `F.linear` (their sums round differently), their fused residual add is exactly the add done
after the GEMM, and one GEMM over concatenated q/k/v (gate/up) rows equals the separate ones. The
fused elementwise kernels (orbitflow_kernels/numba_elementwise.py) are close to the torch expressions
(RoPE's equal), and a row's output is the same bits in any batch, on the serial and the parallel path."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from orbitflow_ray.model.linear import Linear, can_pack
from orbitflow_kernels import numba_elementwise
from orbitflow_ray.model.llama import LlamaLayer, LlamaModel, rms_norm, swiglu
from orbitflow_ray.model.loader import load_model
from orbitflow_ray.model.rope import RotaryEmbedding


def _hf_rms_norm(x, weight, eps):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("hidden", [16, 64, 576, 1000, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_transformers_bit_for_bit(hidden, dtype):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(300, hidden, generator=gen) * 3).to(dtype)
    w = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    assert torch.equal(rms_norm(x, w, 1e-5), _hf_rms_norm(x, w, 1e-5))


needs_onednn = pytest.mark.skipif(not can_pack(torch.empty(1)), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 16, 513])
def test_packed_linear_is_close_to_f_linear_and_fuses_the_add_exactly(rows):
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 64, generator=gen) * 0.1, torch.randn(96, generator=gen)
    x, residual = torch.randn(rows, 64, generator=gen), torch.randn(rows, 96, generator=gen)
    packed, plain = Linear(w, b), Linear(w, b, pack=False)
    assert packed.packed and not plain.packed and plain.weight is w
    assert torch.equal(plain(x), F.linear(x, w, b))
    torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.add_to(x, residual), residual + packed(x))
    assert torch.equal(plain.add_to(x, residual), residual + F.linear(x, w, b))


def test_linear_refuses_bad_shapes_and_does_not_pack_bf16():
    with pytest.raises(ValueError, match="2-D weight"):
        Linear(torch.zeros(4))
    with pytest.raises(ValueError, match="bias of its rows"):
        Linear(torch.zeros(4, 3), torch.zeros(3))
    assert not Linear(torch.zeros(4, 3, dtype=torch.bfloat16)).packed


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("pack", [False, True])
def test_concatenated_projections_equal_the_separate_ones(model, pack):
    weights = load_model(model).weights
    layer = LlamaLayer(weights, 1, pack)
    x = torch.randn(37, weights["norm.weight"].shape[0], generator=torch.Generator().manual_seed(0))
    a = "layers.1.self_attn."
    sep = [Linear(weights[a + n + "_proj.weight"], weights.get(a + n + "_proj.bias"), pack)(x) for n in "qkv"]
    assert all(torch.equal(got, want) for got, want in zip(layer.qkv(x).split(layer.qkv_sizes, -1), sep))
    m = "layers.1.mlp."
    gate, up = layer.gate_up(x).split(layer.intermediate_size, -1)
    assert torch.equal(gate, Linear(weights[m + "gate_proj.weight"], pack=pack)(x))
    assert torch.equal(up, Linear(weights[m + "up_proj.weight"], pack=pack)(x))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])  # tied and untied LM head
@pytest.mark.parametrize("pack", [False, True])
def test_weight_bytes_are_the_loaded_ones_and_a_tied_heads_packed_copy_is_counted_apart(model, pack):
    loaded = load_model(model)
    model = LlamaModel(loaded.spec, loaded.weights, torch.device("cpu"), pack_weights=pack)
    unique = {w.data_ptr(): w.numel() * w.element_size() for w in loaded.weights.values()}
    packed = pack and can_pack(model.embed)
    # Every head is packed where the layers are; a tied one's packed copy is a second copy of the
    # embedding (which the lookup still reads), an untied one's replaces the loaded weight.
    assert model.lm_head.packed == packed
    assert (model.lm_head.weight is model.embed) == (loaded.spec.tie_word_embeddings and not packed)
    copy = model.embed.numel() * model.embed.element_size() if packed and loaded.spec.tie_word_embeddings else 0
    assert model.weight_bytes() == sum(unique.values()) and model.packed_copy_bytes == copy
    hidden = torch.randn(5, model.embed.shape[1], generator=torch.Generator().manual_seed(0))
    head = model.embed if loaded.spec.tie_word_embeddings else loaded.weights["lm_head.weight"]
    torch.testing.assert_close(model.logits(hidden), F.linear(hidden, head), rtol=1e-5, atol=1e-5)


def test_only_the_shard_that_computes_logits_packs_a_tied_head():
    from orbitflow_ray.model.tp import TPShard, shard_weights
    loaded = load_model("tiny-llama")  # tied head
    assert loaded.spec.tie_word_embeddings
    heads = []
    for rank in range(2):
        shard = TPShard(loaded.spec, size=2, rank=rank)
        m = LlamaModel(loaded.spec, shard_weights(loaded.weights, shard), torch.device("cpu"), shard=shard,
                       all_reduce=lambda t: None)
        heads.append((m.lm_head.packed, m.packed_copy_bytes > 0))
    assert heads == [(can_pack(loaded.weights["embed_tokens.weight"]),) * 2, (False, False)]


def _qkv_views(n, h, hkv, d, gen):
    """q [n, h, d] and k [n, hkv, d] as strided views of one qkv GEMM-like output, as the model has them."""
    qkv = torch.randn(n, (h + 2 * hkv) * d, generator=gen) * 2
    q, k, _ = qkv.split((h * d, hkv * d, hkv * d), dim=-1)
    return q.view(n, h, d), k.view(n, hkv, d)


_THREADS = torch.get_num_threads()


# 300 rows of 576 or of 9 + 3 heads of 64 are past PARALLEL_MIN_ELEMS (the parallel path), 1 and 16 are not.
@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("hidden", [16, 576, 1000])
def test_fused_rms_norm_is_close_to_torch(rows, hidden):
    gen = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=gen) * 3
    w = torch.rand(hidden, generator=gen) + 0.5
    got = rms_norm(x, w, 1e-5, fused=True)
    torch.testing.assert_close(got, rms_norm(x, w, 1e-5), rtol=1e-6, atol=1e-6)
    strided = torch.randn(rows, 2 * hidden, generator=gen)[:, hidden:]  # rows apart in memory
    torch.testing.assert_close(rms_norm(strided, w, 1e-5, fused=True), rms_norm(strided, w, 1e-5),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 2, 16), (32, 8, 128)])
def test_fused_rope_equals_torch_on_strided_views(rows, heads):
    h, hkv, d = heads
    gen = torch.Generator().manual_seed(rows + d)
    q, k = _qkv_views(rows, h, hkv, d, gen)
    cos, sin = torch.randn(rows, d, generator=gen), torch.randn(rows, d, generator=gen)
    fq, fk = RotaryEmbedding.apply_cos_sin(q, k, cos, sin, fused=True)
    tq, tk = RotaryEmbedding.apply_cos_sin(q, k, cos, sin)
    assert fq.is_contiguous() and fk.is_contiguous()
    assert torch.equal(fq, tq) and torch.equal(fk, tk)


@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("inter", [8, 1536])
def test_fused_swiglu_is_close_to_torch(rows, inter):
    gen = torch.Generator().manual_seed(rows + inter)
    gate_up = torch.randn(rows, 2 * inter, generator=gen) * 4
    gate_up[0, :4] = torch.tensor([0.0, -100.0, 100.0, -1e4])  # silu's tails and exp's clamp
    got = swiglu(gate_up, inter, fused=True)
    want = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    assert torch.equal(swiglu(gate_up, inter), want)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    assert got[0, 0] == 0 and abs(got[0, 1]) < 1e-30 and got[0, 2] == 100 * gate_up[0, inter + 2]


def test_a_rows_fused_output_does_not_depend_on_the_batch():
    """Each row alone (serial path) equals the same row in a 2,048-row call (parallel path), bit for bit."""
    gen = torch.Generator().manual_seed(7)
    n = 2048
    x, w = torch.randn(n, 576, generator=gen), torch.rand(576, generator=gen) + 0.5
    q, k = _qkv_views(n, 9, 3, 64, gen)
    cos, sin = torch.randn(n, 64, generator=gen), torch.randn(n, 64, generator=gen)
    gate_up = torch.randn(n, 2 * 1536, generator=gen) * 4
    norm, (rq, rk), act = (numba_elementwise.rms_norm(x, w, 1e-5), numba_elementwise.rope(q, k, cos, sin),
                           numba_elementwise.silu_mul(gate_up))
    for r in (0, 5, 1000, n - 1):
        assert torch.equal(numba_elementwise.rms_norm(x[r:r + 1], w, 1e-5), norm[r:r + 1])
        one_q, one_k = numba_elementwise.rope(q[r:r + 1], k[r:r + 1], cos[r:r + 1], sin[r:r + 1])
        assert torch.equal(one_q, rq[r:r + 1]) and torch.equal(one_k, rk[r:r + 1])
        assert torch.equal(numba_elementwise.silu_mul(gate_up[r:r + 1]), act[r:r + 1])
    with torch.inference_mode():
        torch.set_num_threads(1)  # the thread count changes nothing either
        try:
            assert torch.equal(numba_elementwise.rms_norm(x, w, 1e-5), norm)
            assert torch.equal(numba_elementwise.silu_mul(gate_up), act)
        finally:
            torch.set_num_threads(_THREADS)


def test_a_kernel_compiled_after_the_pool_started_on_one_thread_runs(tmp_path):
    """A Ray actor's case: torch (so the pool) at 1 thread, one kernel launches the pool, the next
    compiles only then (cold cache). Numba refuses that compile unless numba_kernel.run sets its size."""
    script = ("import torch; torch.set_num_threads(1)\n"
              "from orbitflow_kernels import numba_elementwise as e\n"
              "e.rms_norm(torch.randn(300, 576), torch.ones(576), 1e-5)\n"
              "print(e.silu_mul(torch.zeros(300, 512)).abs().sum().item())\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", script], env={**env, "NUMBA_CACHE_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0.0"


def test_fused_kernels_refuse_bad_input_by_name():
    with pytest.raises(ValueError, match="rms_norm takes float32 CPU"):
        numba_elementwise.rms_norm(torch.zeros(2, 4, dtype=torch.bfloat16), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="weight \\[hidden\\]"):
        numba_elementwise.rms_norm(torch.zeros(2, 4), torch.ones(5), 1e-5)
    with pytest.raises(ValueError, match="cos, sin \\[N, D\\]"):
        numba_elementwise.rope(torch.zeros(2, 4, 8), torch.zeros(2, 2, 8), torch.zeros(3, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="gate_up \\[N, 2I\\]"):
        numba_elementwise.silu_mul(torch.zeros(2, 7))
    # The model's wrappers keep torch's ops where the kernels do not apply (bf16 here).
    x = torch.randn(3, 8).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-5, fused=True),
                       rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-5))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_fused_model_forward_is_close_to_torch_ops(model):
    loaded = load_model(model)
    fused = LlamaModel(loaded.spec, loaded.weights, torch.device("cpu"))
    plain = LlamaModel(loaded.spec, loaded.weights, torch.device("cpu"), fuse_elementwise=False)
    assert fused.fuse_elementwise and not plain.fuse_elementwise
    ids, pos = torch.arange(40) % loaded.spec.vocab_size, torch.arange(40)

    def attend(_, q, k, v):  # stand-in attention: no KV cache needed to compare the layer math
        return (q[:, : k.shape[1]] * k + v).repeat(1, q.shape[1] // k.shape[1], 1).flatten(1)

    torch.testing.assert_close(fused.forward(ids, pos, attend), plain.forward(ids, pos, attend),
                               rtol=1e-4, atol=1e-5)
