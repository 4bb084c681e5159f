"""Hardware and model specs as data: GPUs from `specs/gpus.yaml`, models from `specs/models/*.json`.

    from orbitflow_ray.sim.hardware import load_gpu, load_model_spec
    gpu = load_gpu("a100-80gb").replace(memory_efficiency=0.85)  # a calibrated copy
    spec = load_model_spec("llama-3.1-8b")

A `GpuSpec` holds datasheet peaks plus the efficiency factors that turn them into achieved rates:
the peaks never change, the factors are what calibration against a real run fits. Models are plain
Hugging Face `config.json` files (config only, no weights), read by the same `spec_from_hf_config`
the engine uses for real checkpoints, so a simulated model has exactly the shapes a served one has.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from orbitflow_ray.model.hf_config import spec_from_hf_config
from orbitflow_ray.model.spec import ModelSpec

SPECS_DIR = Path(__file__).parent / "specs"
_FRACTIONS = ("compute_efficiency", "memory_efficiency", "host_link_efficiency", "interconnect_efficiency")
_NON_NEGATIVE = ("interconnect_latency_s", "per_layer_overhead_s", "per_step_overhead_s",
                 "per_seq_layer_overhead_s", "copy_compute_s_per_byte")


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s, no sparsity
    hbm_bytes_per_s: float
    hbm_bytes: int
    host_link_bytes_per_s: float  # nominal, one direction (PCIe Gen4 x16: 32e9)
    interconnect_bytes_per_s: float  # one direction, what TP all-reduces use (NVLink or PCIe)
    # Large bf16 GEMMs reach ~60-75% of peak on A100/H100 (cuBLAS at LLM shapes).
    compute_efficiency: float = 0.7
    # Streaming weights and KV reaches ~80% of HBM bandwidth (GEMV / paged-attention kernels).
    memory_efficiency: float = 0.8
    # Pinned-memory cudaMemcpyAsync reaches ~25 GB/s of PCIe Gen4's 32 GB/s.
    host_link_efficiency: float = 0.8
    # NCCL ring bus bandwidth share, and per-hop latency, which dominates decode-sized all-reduces:
    # ~2 us a hop on NVLink puts a 4-GPU all-reduce of a few hundred KB near 10 us, as nccl-tests show.
    interconnect_efficiency: float = 0.8
    interconnect_latency_s: float = 2e-6
    # Launch gaps not hidden behind GPU work; small with CUDA graphs, large on CPUs and tiny models.
    per_layer_overhead_s: float = 2e-5
    # Scheduling, input preparation and sampling, once per step.
    per_step_overhead_s: float = 5e-4
    # Per sequence per layer (attention dispatched per request: on our CPU path each prefill chunk is
    # its own attention call after its own KV gather; decodes are batched, as paged kernels on a GPU).
    per_seq_layer_overhead_s: float = 0.0
    # Compute time each copied KV byte costs the step: 0 where DMA engines copy (GPUs); on the CPU
    # backend the copy thread shares the cores and the memory bandwidth with compute.
    copy_compute_s_per_byte: float = 0.0
    # Achieved share of HBM bandwidth when attention reads paged KV; None: memory_efficiency.
    kv_read_efficiency: float | None = None

    def __post_init__(self) -> None:
        for f in ("peak_flops", "hbm_bytes_per_s", "hbm_bytes", "host_link_bytes_per_s", "interconnect_bytes_per_s"):
            value = getattr(self, f)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"GPU {self.name!r}: {f} must be a positive number, got {value!r}")
        for f in _FRACTIONS + (("kv_read_efficiency",) if self.kv_read_efficiency is not None else ()):
            value = getattr(self, f)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"GPU {self.name!r}: {f} must be in (0, 1], got {value!r}")
        for f in _NON_NEGATIVE:
            value = getattr(self, f)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"GPU {self.name!r}: {f} must be >= 0 seconds, got {value!r}")

    def replace(self, **changes) -> GpuSpec:
        """A copy with some fields changed (e.g. calibrated efficiencies), validated again."""
        return dataclasses.replace(self, **changes)

    @property
    def flops(self) -> float:
        """Achieved GEMM FLOP/s."""
        return self.peak_flops * self.compute_efficiency

    @property
    def memory_bytes_per_s(self) -> float:
        """Achieved HBM bandwidth."""
        return self.hbm_bytes_per_s * self.memory_efficiency

    @property
    def link_bytes_per_s(self) -> float:
        """Effective host <-> device bandwidth, one direction."""
        return self.host_link_bytes_per_s * self.host_link_efficiency

    @property
    def interconnect_effective_bytes_per_s(self) -> float:
        return self.interconnect_bytes_per_s * self.interconnect_efficiency


@lru_cache(maxsize=None)
def _gpu_table() -> dict[str, dict]:
    with open(SPECS_DIR / "gpus.yaml") as f:
        return yaml.safe_load(f)


def available_gpus() -> list[str]:
    return sorted(_gpu_table())


def load_gpu(name: str) -> GpuSpec:
    """A GPU by name, or from a YAML file holding one entry (what `orbitflow calibrate` writes)."""
    table = _gpu_table()
    path = Path(name)
    if name not in table and path.suffix in (".yaml", ".yml") and path.is_file():
        entries = yaml.safe_load(path.read_text()) or {}
        if len(entries) != 1:
            raise ValueError(f"{path}: expected one GPU entry, found {len(entries)}")
        (name, entry), = entries.items()
        return _build(name, dict(entry or {}))
    if name not in table:
        raise ValueError(f"unknown GPU {name!r}; valid GPUs: {', '.join(available_gpus())} "
                         "(or a calibrated .yaml file)")
    return _build(name, dict(table[name] or {}))


def save_gpu(gpu: GpuSpec, path: str | Path) -> None:
    entry = {k: v for k, v in dataclasses.asdict(gpu).items() if k != "name"}
    Path(path).write_text(yaml.safe_dump({gpu.name: entry}, sort_keys=False))


def _build(name: str, entry: dict) -> GpuSpec:
    known = {f.name for f in dataclasses.fields(GpuSpec)} - {"name"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"GPU {name!r}: unknown fields {unknown}; valid fields: {', '.join(sorted(known))}")
    try:
        # PyYAML reads 312e12 (no dot) as a string; accept both spellings.
        values = {k: int(v) if k == "hbm_bytes" else float(v) for k, v in entry.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"GPU {name!r}: non-numeric field ({e})") from None
    return GpuSpec(name=name, **values)


def available_models() -> list[str]:
    return sorted(p.stem for p in (SPECS_DIR / "models").glob("*.json"))


def load_model_spec(name: str) -> ModelSpec:
    """A spec from specs/models, else any model the engine knows (presets, the GGUF default
    model, a local HF directory): calibration simulates the very model it measured."""
    if name not in available_models():
        from orbitflow_ray.model.loader import load_spec

        try:
            return load_spec(name)
        except ValueError:
            raise ValueError(f"unknown model {name!r}; valid models: {', '.join(available_models())} "
                             "or any model the engine loads") from None
    with open(SPECS_DIR / "models" / f"{name}.json") as f:
        return spec_from_hf_config(json.load(f), name=name)
