"""The layer math's building blocks against the expressions they replace: our RMSNorm (its last
multiply in place) equals transformers' bit for bit; oneDNN-packed linears (model/linear.py) are
close to `F.linear` (their sums round differently), their fused residual add is exactly the add done
after the GEMM, and one GEMM over concatenated q/k/v (gate/up) rows equals the separate ones."""

import pytest
import torch
import torch.nn.functional as F

from orbitflow_ray.model.linear import Linear, can_pack
from orbitflow_ray.model.llama import LlamaLayer, LlamaModel, rms_norm
from orbitflow_ray.model.loader import load_model


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
def test_weight_bytes_are_the_loaded_ones_with_a_tied_head_once(model):
    loaded = load_model(model)
    model = LlamaModel(loaded.spec, loaded.weights, torch.device("cpu"))
    unique = {w.data_ptr(): w.numel() * w.element_size() for w in loaded.weights.values()}
    assert model.weight_bytes() == sum(unique.values())
    # A tied head stays the embedding tensor (unpacked); an untied one is packed like the layers.
    assert (model.lm_head.weight is model.embed) == loaded.spec.tie_word_embeddings
    assert model.lm_head.packed == (can_pack(model.embed) and not loaded.spec.tie_word_embeddings)
