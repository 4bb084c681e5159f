"""Our RoPE must equal transformers' to the bit, or greedy outputs drift apart after a few tokens."""

import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from orbitflow_ray.model.hf_config import to_hf_config  # noqa: E402
from orbitflow_ray.model.presets import get_preset  # noqa: E402
from orbitflow_ray.model.rope import RotaryEmbedding, inv_freq_and_scaling  # noqa: E402
from orbitflow_ray.model.spec import ModelSpec  # noqa: E402

# Default RoPE (tiny-llama, tiny-qwen2, mistral-7b) and llama3 scaling (tiny-llama3, llama-3.1-8b), at
# head_dim 16 and 128, plus the huge theta of the 1M-context model.
SPECS = ["tiny-llama", "tiny-qwen2", "tiny-llama3", "llama-3.1-8b", "llama-3-8b-1048k", "mistral-7b"]


def hf_rope(spec: ModelSpec):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    cls = Qwen2RotaryEmbedding if spec.attention_bias else LlamaRotaryEmbedding
    return cls(to_hf_config(spec)), apply_rotary_pos_emb


def reference(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
    """transformers' path: [batch=1, heads, seq, dim] layout, position_ids [1, seq]."""
    rotary, apply = hf_rope(spec)
    cos, sin = rotary(q, positions[None])
    q_out, k_out = apply(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return cos[0], sin[0], q_out[0].transpose(0, 1), k_out[0].transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SPECS)
def test_matches_transformers_bit_for_bit(name, dtype):
    spec = get_preset(name)
    gen = torch.Generator().manual_seed(0)
    n = 300
    positions = torch.cat([torch.arange(40), torch.randint(0, 5001, (n - 41,), generator=gen), torch.tensor([5000])])
    q = torch.randn(n, spec.num_heads, spec.head_dim, generator=gen).to(dtype)
    k = torch.randn(n, spec.num_kv_heads, spec.head_dim, generator=gen).to(dtype)

    cos_ref, sin_ref, q_ref, k_ref = reference(spec, q, k, positions)
    rope = RotaryEmbedding(spec)
    cos, sin = rope.cos_sin(positions, dtype)
    assert cos.shape == (n, spec.head_dim) and cos.dtype == dtype
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    q_out, k_out = rope.apply(q, k, positions)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    # The engine computes cos/sin once per step in float32 and applies them per layer.
    q2, k2 = rope.apply_cos_sin(q, k, *rope.cos_sin(positions))
    assert torch.equal(q2, q_ref) and torch.equal(k2, k_ref)


@pytest.mark.parametrize("name", SPECS)
def test_inv_freq_is_transformers(name):
    spec = get_preset(name)
    rotary, _ = hf_rope(spec)
    inv_freq, scaling = inv_freq_and_scaling(spec)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (spec.head_dim // 2,)
    assert torch.equal(inv_freq, rotary.inv_freq)
    assert scaling == rotary.attention_scaling


def test_llama3_scaling_changes_only_low_frequencies():
    scaled = get_preset("tiny-llama3")
    plain = replace(scaled, rope_scaling=None)
    a, _ = inv_freq_and_scaling(scaled)
    b, _ = inv_freq_and_scaling(plain)
    assert torch.equal(a[:2], b[:2])  # wavelengths below original_max / high_freq_factor: untouched
    assert torch.allclose(a[-1], b[-1] / 8)  # the longest wavelengths are divided by the factor
    assert not torch.equal(a, b)


def test_position_zero_is_identity():
    rope = RotaryEmbedding(get_preset("tiny-llama"))
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 16)
    q_out, k_out = rope.apply(q, k, torch.tensor([0]))
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


def test_dynamic_rope_is_rejected():
    spec = replace(get_preset("tiny-llama"), rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic"):
        RotaryEmbedding(spec)
