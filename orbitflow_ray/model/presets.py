"""Named model specs that need no download: tiny random-initialised models and real architectures.

Tiny presets (`tiny-*`) are small enough to materialise with random weights in milliseconds, so unit
tests and CI exercise every code path (GQA, q/k/v bias, untied lm_head, llama3 RoPE scaling) without
a checkpoint. The big presets carry the published architecture numbers of real models and are
config-only: the planner and the simulator need their shapes, never their weights. For speed
benchmarks on a GPU, `random:<preset>` (e.g. `random:llama-3.1-8b`) names any preset with cheap
random weights (`loader.tiled_random_weights`): real shapes, meaningless tokens.
"""

from __future__ import annotations

from orbitflow_ray.model.spec import ModelSpec

# Llama 3.1's RoPE scaling, as in its config.json.
_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
_LLAMA3_EOS = (128001, 128009)  # <|end_of_text|>, <|eot_id|> (Instruct generation_config)


def _tiny(name: str, **overrides) -> ModelSpec:
    base = dict(name=name, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
                tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))
    base.update(overrides)
    return ModelSpec(**base)


_TINY = [
    _tiny("tiny-llama"),
    # Qwen2 layout: biases on q/k/v only, separate lm_head.
    _tiny("tiny-qwen2", attention_bias=True, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1e6),
    # Tied like Llama 3.2 1B/3B; Llama 3.1 scaling shrunk to the tiny model: original context 256 -> 2048
    # (factor 8). With head_dim 16 and theta 5e5 the wavelengths (6 .. 6e5) fall in all three llama3
    # bands: kept, smoothed and divided.
    _tiny("tiny-llama3", rope_theta=500000.0,
          rope_scaling={**_LLAMA31_ROPE, "original_max_position_embeddings": 256}),
    # Long-context tests (a 16K-token prefill in seconds): tiny-llama with a 32K window.
    _tiny("tiny-llama-32k", max_position_embeddings=32768),
]

_CONFIG_ONLY = [
    # meta-llama/Llama-3.1-8B-Instruct
    ModelSpec(name="llama-3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
              num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
              max_position_embeddings=131072, tie_word_embeddings=False, rope_scaling=dict(_LLAMA31_ROPE),
              bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    # meta-llama/Meta-Llama-3-70B-Instruct
    ModelSpec(name="llama-3-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
              num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
              max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
              eos_token_ids=_LLAMA3_EOS),
    # gradientai/Llama-3-8B-Instruct-Gradient-1048k: Llama 3 8B with theta raised for a 1M context.
    ModelSpec(name="llama-3-8b-1048k", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
              num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=3580165449.0,
              max_position_embeddings=1048576, tie_word_embeddings=False, bos_token_id=128000,
              eos_token_ids=_LLAMA3_EOS),
    # Qwen/Qwen2.5-7B-Instruct (the base model's config says 131072 positions, via YaRN; Instruct ships 32768).
    ModelSpec(name="qwen2.5-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
              num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
              max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=True,
              bos_token_id=151643, eos_token_ids=(151645, 151643)),
    # mistralai/Mistral-7B-Instruct-v0.3 (v0.2+ dropped v0.1's sliding window, so it is a plain Llama layout).
    ModelSpec(name="mistral-7b", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32,
              num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0,
              max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,)),
]

PRESETS: dict[str, ModelSpec] = {s.name: s for s in _TINY + _CONFIG_ONLY}
# Presets whose weights are never materialised (tens of GB of random numbers help nobody).
CONFIG_ONLY: frozenset[str] = frozenset(s.name for s in _CONFIG_ONLY)


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())}") from None


def is_config_only(name: str) -> bool:
    return name in CONFIG_ONLY


RANDOM_PREFIX = "random:"


def random_init_preset(name: str) -> ModelSpec | None:
    """The spec `random:<preset>` names; None for a name without the prefix; raises for an unknown preset."""
    if not name.startswith(RANDOM_PREFIX):
        return None
    return get_preset(name.removeprefix(RANDOM_PREFIX))
