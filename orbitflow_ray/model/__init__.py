"""Model definition and loading: architecture specs, weights, tokenizer, RoPE."""

from orbitflow_ray.model.loader import LoadedModel, load_model, load_spec
from orbitflow_ray.model.rope import RotaryEmbedding
from orbitflow_ray.model.spec import ModelSpec

__all__ = ["LoadedModel", "ModelSpec", "RotaryEmbedding", "load_model", "load_spec"]
