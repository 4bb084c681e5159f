"""Translation between our `ModelSpec` and Hugging Face configs, in both directions.

Reading handles transformers 5 configs (`rope_parameters` holds `rope_theta` and the scaling, and the
config object has no `rope_theta` attribute) as well as older `config.json` files (`rope_theta` at
the top level, scaling in `rope_scaling` with either `type` or `rope_type`). Writing builds the
`LlamaConfig`/`Qwen2Config` that makes transformers compute exactly what our engine computes, which
is what the RoPE tables and the test oracle are derived from.
"""

from __future__ import annotations

from typing import Any

from orbitflow_ray.model.spec import ModelSpec

_SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def _getter(cfg: Any):
    if isinstance(cfg, dict):
        return cfg.get
    return lambda key, default=None: getattr(cfg, key, default)


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def rope_from_hf_config(cfg: Any) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either config generation."""
    get = _getter(cfg)
    params = dict(get("rope_parameters") or get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type RoPE parameters are not supported: {sorted(params)}")
    theta = float(params.pop("rope_theta", None) or get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn", "longrope"):
        # transformers falls back to max_position_embeddings the same way.
        params.setdefault("original_max_position_embeddings", get("max_position_embeddings"))
    return theta, {"rope_type": rope_type, **params}


def _check_supported(get) -> None:
    model_type = get("model_type")
    if model_type not in _SUPPORTED_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(_SUPPORTED_TYPES)}")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {get('hidden_act')!r} is not supported (only silu)")
    # Llama's attention_bias also adds an o_proj bias, and mlp_bias adds three more: neither is in our layout.
    if model_type != "qwen2" and (get("attention_bias", False) or get("mlp_bias", False)):
        raise ValueError("Llama-family configs with attention_bias/mlp_bias are not supported")
    window = get("sliding_window") if get("use_sliding_window", model_type == "mistral") else None
    if window is not None and window < get("max_position_embeddings"):
        raise ValueError(f"sliding-window attention (window {window}) is not supported")


def spec_from_hf_config(cfg: Any, name: str | None = None, generation_config: Any = None) -> ModelSpec:
    """A `ModelSpec` from a transformers config object or a raw `config.json` dict.

    EOS ids are the union of the config's and the generation config's, in that order: chat models often
    list the end-of-turn token only in generation_config.json.
    """
    get = _getter(cfg)
    _check_supported(get)
    heads = get("num_attention_heads")
    theta, scaling = rope_from_hf_config(cfg)
    eos = _as_ids(get("eos_token_id"))
    if generation_config is not None:
        eos += [t for t in _as_ids(_getter(generation_config)("eos_token_id")) if t not in eos]
    return ModelSpec(
        name=name or get("_name_or_path") or get("model_type"),
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_layers=get("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or get("hidden_size") // heads,
        rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=theta,
        max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        attention_bias=get("model_type") == "qwen2",
        rope_scaling=scaling,
        bos_token_id=get("bos_token_id"),
        eos_token_ids=tuple(eos),
    )


def hf_rope_parameters(spec: ModelSpec) -> dict:
    """The transformers 5 `rope_parameters` dict for this spec."""
    params = {"rope_type": "default", "rope_theta": spec.rope_theta}
    params.update(spec.rope_scaling or {})
    return params


def to_hf_config(spec: ModelSpec):
    """A `LlamaConfig` (or `Qwen2Config` when q/k/v carry biases) describing the same network."""
    from transformers import LlamaConfig, Qwen2Config

    eos = list(spec.eos_token_ids)
    common = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters=hf_rope_parameters(spec), hidden_act="silu", bos_token_id=spec.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
    )
    if spec.attention_bias:
        return Qwen2Config(**common, use_sliding_window=False)
    return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
