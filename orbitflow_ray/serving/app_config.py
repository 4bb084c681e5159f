"""The serving application's arguments: one pydantic model, validated when the app is built, so
a bad config fails `serve run` at once with a message that names the field."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orbitflow_ray.config import EngineConfig


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2-135m", description="Engine model: 'smollm2-135m', a local HF directory "
                       "(Llama family) or a preset. Nothing is downloaded.")
    served_model_name: str | None = Field(None, description="Name clients pass as `model` (default: model).")
    engine: dict[str, Any] = Field(default_factory=lambda: {"kv_policy": "orbitflow"},
                                   description="EngineConfig fields (see `orbitflow run --help`).")
    tensor_parallel_size: int = Field(1, description="Shards per worker replica (tensor parallelism): each "
                                      "replica drives this many shard actors in one Ray placement group, one "
                                      "GPU each on a cluster (one CPU on the cpu backend), so the replica "
                                      "itself needs no GPU (ray_actor_options num_gpus: 0). KV budgets in "
                                      "args.engine are per shard.")
    default_ttft_slo_s: float = Field(10.0, description="TTFT SLO for requests that set none; the TPOT "
                                      "default is engine.tpot_slo_s.")
    torch_threads: int | None = Field(None, description="Torch threads per worker; None: as Ray sets "
                                      "OMP_NUM_THREADS from the replica's num_cpus.")
    telemetry_period_s: float = Field(0.5, description="Worker -> planner report period. 0.5 s: a few "
                                      "decode steps on a GPU, cheap next to a step on this CPU.")
    planner: bool = Field(True, description="False: no central planner; workers plan locally only.")
    api_key: str | None = Field(None, description="Bearer token required on /v1/* (compared in constant "
                                "time). None: the ORBITFLOW_API_KEY environment variable of the ingress, "
                                "if set; else open.")
    allowed_origins: list[str] = Field(default_factory=lambda: ["*"], description="CORS: origins whose "
                                       "browser pages may call the API (['*']: any, as vLLM's default). "
                                       "Preflights are answered without the API key, as browsers send none.")
    max_prompt_tokens: int | None = Field(None, description="Longest prompt accepted (tokens); None: the "
                                          "context window.")
    max_output_tokens: int | None = Field(None, description="Largest max_tokens accepted; None: what the "
                                          "context window leaves.")
    max_request_body_bytes: int = Field(8 << 20, description="Largest request body (bytes); past it, 413. "
                                        "8 MiB: SmolLM2's longest acceptable prompt (8,191 tokens x at most "
                                        "81 characters a token) is 4 MB even with every character JSON-escaped "
                                        "as \\uXXXX; the limit bounds the ingress's memory per request.")
    max_waiting_per_worker: int = Field(64, description="Requests a worker holds beyond its running batch; "
                                        "past it, 429 with Retry-After. Bounds memory under overload.")

    @field_validator("default_ttft_slo_s", "telemetry_period_s")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError("must be a positive number of seconds")
        return v

    @field_validator("torch_threads", "tensor_parallel_size", "max_prompt_tokens", "max_output_tokens", "max_waiting_per_worker",
                     "max_request_body_bytes")
    @classmethod
    def _at_least_one(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and len(v) < 8:
            raise ValueError("must be at least 8 characters (or null for none)")
        return v

    @model_validator(mode="after")
    def _engine_valid(self) -> AppArgs:
        for top in ("model", "tensor_parallel_size"):
            if top in self.engine:
                raise ValueError(f"set {top} at the top level (args.{top}), not in args.engine")
        try:
            cfg = self.engine_config()
        except TypeError as e:
            raise ValueError(f"args.engine: {e}") from None
        from orbitflow_ray.planner import available_policies
        if cfg.kv_policy not in available_policies():
            raise ValueError(f"args.engine.kv_policy {cfg.kv_policy!r} is unknown; choose one of "
                             f"{available_policies()}")
        if self.tensor_parallel_size > 1:
            from orbitflow_ray.model.loader import load_spec
            from orbitflow_ray.model.tp import check_tp
            try:
                spec = load_spec(self.model)
            except (ValueError, OSError):  # not on this machine (a cluster path): the engine checks on its node
                spec = None
            if spec is not None:
                check_tp(spec, self.tensor_parallel_size)
        return self

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, tensor_parallel_size=self.tensor_parallel_size, **self.engine)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model
