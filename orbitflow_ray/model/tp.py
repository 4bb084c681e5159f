"""Tensor-parallel layout (Megatron): which heads, MLP columns and weight rows one shard holds.

    shard = TPShard(spec, size=3, rank=1)
    local = shard_weights(load_model("smollm2-135m").weights, shard)

Column-parallel linears (q, k, v, gate, up) keep a contiguous block of output rows per shard;
row-parallel linears (o, down) keep the matching input columns, and their partial outputs are summed
by one all-reduce each, so a layer costs `ALLREDUCES_PER_LAYER` all-reduces. Query heads split
evenly; KV heads split evenly too, or, with more shards than KV heads, each KV head is replicated on
the size / num_kv_heads shards whose query heads read it (vLLM's rule), so one shard holds
`kv_heads_per_shard` heads of every layer's KV. The embedding, the final norm and the LM head stay
replicated on every shard (rank 0 alone computes logits and samples). `TPShard.weight_slice` is
the one statement of which part of each weight a shard keeps: `shard_weights` cuts loaded tensors
with it, `model/tp_loader.py` reads just that part from safetensors files. The simulator's roofline
(`sim/roofline.py`) reads the same functions and replicates the same weights, so both count the
same weight and KV bytes per shard and the same all-reduces per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orbitflow_ray.model.spec import ModelSpec

ALLREDUCES_PER_LAYER = 2  # after attention's o_proj and after the MLP's down_proj
# Column-parallel linears keep output rows (dim 0), row-parallel ones input columns (dim 1).
_SPLIT_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0, "o_proj": 1, "down_proj": 1}


def check_tp(spec: ModelSpec, size: int) -> None:
    """Raise ValueError unless `size` shards can split spec's heads, KV heads and MLP columns."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    if spec.num_heads % size or spec.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size={size} must divide num_heads={spec.num_heads} and "
                         f"intermediate_size={spec.intermediate_size} of {spec.name}")
    if spec.num_kv_heads % size and size % spec.num_kv_heads:
        raise ValueError(f"tensor_parallel_size={size} must divide num_kv_heads={spec.num_kv_heads} of "
                         f"{spec.name}, or be a multiple of it (KV heads are then replicated)")


def kv_heads_per_shard(spec: ModelSpec, size: int) -> int:
    """KV heads of each layer one shard holds (replicated ones included)."""
    return -(-spec.num_kv_heads // size)


def kv_bytes_per_token_per_layer(spec: ModelSpec, size: int, dtype_bytes: int) -> int:
    """K and V of one token in one layer on one shard: the unit of the per-shard byte budgets."""
    return 2 * kv_heads_per_shard(spec, size) * spec.head_dim * dtype_bytes


def allreduces_per_step(spec: ModelSpec, size: int) -> int:
    """All-reduces one forward step issues on each shard (none without tensor parallelism)."""
    return ALLREDUCES_PER_LAYER * spec.num_layers if size > 1 else 0


@dataclass(frozen=True, slots=True)
class TPShard:
    """Shard `rank` of `size`: its query heads, KV heads and MLP columns, as [start, start + n)."""

    spec: ModelSpec
    size: int
    rank: int

    def __post_init__(self) -> None:
        check_tp(self.spec, self.size)
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")

    @property
    def num_heads(self) -> int:
        return self.spec.num_heads // self.size

    @property
    def num_kv_heads(self) -> int:
        return kv_heads_per_shard(self.spec, self.size)

    @property
    def head_start(self) -> int:
        return self.rank * self.num_heads

    @property
    def kv_head_start(self) -> int:
        # Query head h reads KV head h // group; a shard's query heads share one group or span whole ones.
        group = self.spec.num_heads // self.spec.num_kv_heads
        return self.head_start // group if self.size > self.spec.num_kv_heads else self.rank * self.num_kv_heads

    @property
    def intermediate_size(self) -> int:
        return self.spec.intermediate_size // self.size

    def kv_bytes_per_token_per_layer(self, dtype_bytes: int) -> int:
        return kv_bytes_per_token_per_layer(self.spec, self.size, dtype_bytes)

    def weight_slice(self, name: str) -> tuple[int, slice] | None:
        """(dim, [start, stop)) of weight `name` (our names: `layers.0.mlp.up_proj.weight`) this
        shard keeps: dim 0 (output rows, and a bias) of column-parallel q/k/v/gate/up, dim 1 (input
        columns) of row-parallel o/down; None for weights every shard holds whole (norms, embedding,
        LM head), and for every weight when size is 1."""
        proj = name.split(".")[-2] if name.startswith("layers.") else ""
        if self.size == 1 or proj not in _SPLIT_DIM:
            return None
        hd = self.spec.head_dim
        if proj in ("q_proj", "o_proj"):
            part = slice(self.head_start * hd, (self.head_start + self.num_heads) * hd)
        elif proj in ("k_proj", "v_proj"):
            part = slice(self.kv_head_start * hd, (self.kv_head_start + self.num_kv_heads) * hd)
        else:
            part = slice(self.rank * self.intermediate_size, (self.rank + 1) * self.intermediate_size)
        return _SPLIT_DIM[proj], part


def weight_bytes_per_shard(spec: ModelSpec, size: int, dtype_bytes: int) -> int:
    """Bytes of the weights one shard of `size` holds: its slices of q/k/v/o and the MLP, the
    norms, and the embedding and LM head whole (replicated, as `shard_weights` keeps them)."""
    h, hd = spec.hidden_size, spec.head_dim
    heads, kv_heads = spec.num_heads // size, kv_heads_per_shard(spec, size)
    qkv_out = (heads + 2 * kv_heads) * hd
    layer = h * qkv_out + heads * hd * h + 3 * h * (spec.intermediate_size // size) + 2 * h  # + 2 norms
    if spec.attention_bias:
        layer += qkv_out
    emb = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return (spec.num_layers * layer + emb + h) * dtype_bytes


def shard_weights(weights: dict[str, torch.Tensor], shard: TPShard) -> dict[str, torch.Tensor]:
    """Shard's slice of every weight (contiguous copies, so the full tensors can be freed);
    weights it does not split (norms, embedding, LM head) are the same tensor objects."""
    if shard.size == 1:
        return dict(weights)
    out = {}
    for name, w in weights.items():
        cut = shard.weight_slice(name)
        if cut is None:
            out[name] = w
        else:
            dim, part = cut
            out[name] = (w[part] if dim == 0 else w[:, part]).contiguous()
    return out
