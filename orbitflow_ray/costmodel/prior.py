"""Where the engine's online cost model starts: the simulator's roofline of the device it runs on.

The online fit (`linear.OnlineCostModel`) moves a coefficient from the prior only as far as the
window's steps resolve it, so the prior prices what a process has not run yet: the first join of
a second request, the first offloaded step. The roofline (`sim/roofline.py`) of a calibrated device
spec (`sim/specs/gpus.yaml`) at the served model's shapes gives (a, b, p), the LM-head tail and, on
the CPU backend, what a copied byte costs in compute. The CPU backend uses `cpu-2core` (calibrated
with `orbitflow calibrate` on the development machine: a prior, which the fit scales to this
machine within a window of steps); CUDA the spec named like the device (`gpu_spec_for`), else the
generic prior of `linear.default_prior`.
"""

from __future__ import annotations

from dataclasses import replace

from orbitflow_ray.costmodel.linear import CostModel, default_prior
from orbitflow_ray.model.spec import ModelSpec
from orbitflow_ray.sim.hardware import load_gpu
from orbitflow_ray.sim.roofline import Roofline

CPU_SPEC = "cpu-2core"
# (substring of torch.cuda.get_device_name(), spec in sim/specs/gpus.yaml), first match wins.
_CUDA_SPECS = (("H200", "h200"), ("H100 PCIe", "h100-80gb-pcie"), ("H100", "h100-80gb-sxm"),
               ("A100-SXM4-40GB", "a100-40gb"), ("A100-PCIE-40GB", "a100-40gb"), ("A100", "a100-80gb"),
               ("L40S", "l40s"), ("RTX A6000", "rtx-a6000"))
# The decode batch the roofline's tangent is taken at: (requests, cached tokens each).
_ANCHOR = (1, 1024)


def gpu_spec_for(device_name: str) -> str | None:
    """The spec in `sim/specs/gpus.yaml` for a CUDA device name (``torch.cuda.get_device_name()``,
    e.g. "NVIDIA H100 80GB HBM3" -> "h100-80gb-sxm"), or None for a device without one."""
    for key, spec in _CUDA_SPECS:
        if key.lower() in device_name.lower():
            return spec
    return None


def engine_prior(spec: ModelSpec, backend: str, link_bytes_per_s: float | None, dtype_bytes: int,
                 tp: int = 1, device_name: str | None = None) -> CostModel:
    """The prior for an engine serving `spec` (weights and KV of `dtype_bytes` bytes, `tp` shards)
    on `backend` ("cpu" or "cuda"; `device_name` the CUDA device's). `link_bytes_per_s`: the
    configured (emulated) link, else the spec's. Raises ValueError for an unknown backend."""
    if backend == "cpu":
        gpu = CPU_SPEC
    elif backend == "cuda":
        gpu = gpu_spec_for(device_name or "")
        if gpu is None:
            return default_prior(spec.num_layers, link_bytes_per_s, backend)
    else:
        raise ValueError(f"unknown backend {backend!r}: expected 'cpu' or 'cuda'")
    model = Roofline(spec, load_gpu(gpu), tp, dtype_bytes).cost_model(*_ANCHOR)
    return replace(model, link_bytes_per_s=link_bytes_per_s or model.link_bytes_per_s)
