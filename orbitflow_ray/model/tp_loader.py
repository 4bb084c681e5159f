"""One tensor-parallel shard's weights, read so that a shard never holds the whole checkpoint.

    shard = TPShard(load_spec("/models/llama-3-70b"), size=4, rank=1)
    weights = load_shard_weights("/models/llama-3-70b", shard, torch.bfloat16)

For a local Hugging Face directory of *.safetensors files each tensor is read on its own, and of a
split tensor only the shard's part (`TPShard.weight_slice`: output rows of q/k/v/gate/up, input
columns of o/down, KV heads replicated when there are more shards than KV heads) is copied out of
the memory-mapped file, so a shard's host memory peaks at its own weights plus one tensor's slice:
Llama-3-70B (140 GB in bf16) at TP-4 needs ~35 GB of split weights and the replicated embedding,
norms and LM head per shard, not 4 x 140 GB at once. Every other source keeps the load-then-slice
path (`load_model` then `shard_weights`): the built-in GGUF (SmolLM2, dequantised by transformers
as a whole), pytorch_model*.bin directories (pickles cannot be read in part), presets and
`random:` names (drawn whole from one seeded generator, so each shard sees the TP-1 values).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from orbitflow_ray.model.loader import _local_dir, expected_shapes, load_model
from orbitflow_ray.model.tp import TPShard, shard_weights


def load_shard_weights(model: str, shard: TPShard, dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Shard's slice of every weight of `model` (our names, `dtype`, contiguous, on the CPU), equal
    tensor by tensor to `shard_weights(load_model(model, dtype, seed).weights, shard)`."""
    path = _local_dir(model)
    if path is not None and any(path.glob("*.safetensors")):
        return read_safetensors_shard(path, shard, dtype)
    loaded = load_model(model, dtype=dtype, seed=seed)
    return shard_weights(loaded.weights, shard)


def read_safetensors_shard(path: Path, shard: TPShard, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read shard's part of every tensor in path/*.safetensors, one tensor at a time. Raises
    ValueError naming the tensors that are missing, unexpected or of the wrong full shape."""
    spec = shard.spec
    expected = expected_shapes(spec)
    out: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if "rotary_emb" in key:
                    continue
                name = key.removeprefix("model.")
                part = st.get_slice(key)
                full = tuple(part.get_shape())
                if name in expected and full != expected[name]:
                    wrong.append(f"{name}: {full} != {expected[name]}")
                    continue
                cut = shard.weight_slice(name)
                if cut is None:
                    t = part[:]
                else:
                    dim, sl = cut
                    t = part[sl] if dim == 0 else part[:, sl]
                out[name] = t.to(dtype).contiguous()
    if spec.tie_word_embeddings and "embed_tokens.weight" in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    missing, extra = sorted(set(expected) - set(out)), sorted(set(out) - set(expected))
    if missing or extra or wrong:  # full shapes were checked before slicing
        raise ValueError(f"checkpoint {path} does not match {spec.name}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}")
    return out
