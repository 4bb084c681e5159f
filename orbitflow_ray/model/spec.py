"""The architecture facts of a Llama-family model that the engine, planner and simulator need.

A `ModelSpec` is plain data: it can be built from a Hugging Face config (real models), from a preset
(random-initialised or config-only models for the simulator), and it says how many bytes of KV one
token costs per layer, which is the unit the placement planner works in.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Qwen2 has biases on q/k/v; Llama, Mistral and SmolLM2 do not.
    attention_bias: bool = False
    # HF `rope_scaling`/`rope_parameters` dict when the type is not "default" (e.g. llama3), else None.
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def kv_bytes_per_token_per_layer(self, dtype_bytes: int) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        """Weights count, used by the cost model (roofline of linear layers)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * self.num_heads * hd * 2 + h * self.num_kv_heads * hd * 2
        mlp = 3 * h * i
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + emb + h
