"""Transfer engines that move KV blocks between the device and host tiers (CUDA via CuPy, CPU),
and the attention-side gather/scatter on the paged KV pool."""

from __future__ import annotations

import torch

from orbitflow_kernels.base import Direction, TransferEngine, TransferError, TransferJob
from orbitflow_kernels.cpu import CpuTransferEngine
from orbitflow_kernels.cuda import CudaTransferEngine
from orbitflow_kernels.gather import gather_kv, scatter_tokens

BACKENDS = ("cpu", "cuda")

__all__ = ["BACKENDS", "CpuTransferEngine", "CudaTransferEngine", "Direction", "TransferEngine",
           "TransferError", "TransferJob", "gather_kv", "make_transfer_engine", "scatter_tokens"]


def make_transfer_engine(backend: str, bandwidth_bytes_per_s: float | None = None,
                         device: int | str | torch.device | None = None,
                         prefault_device: bool = False) -> TransferEngine:
    """The engine for `backend`. The bandwidth limit and `prefault_device` are CPU-only: on CUDA
    the real link sets the speed, and device memory is held when allocated."""
    if backend == "cpu":
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"the cpu backend computes on the CPU, got device={device!r}")
        return CpuTransferEngine(bandwidth_bytes_per_s, prefault_device=prefault_device)
    if backend == "cuda":
        if bandwidth_bytes_per_s is not None:
            raise ValueError("bandwidth_bytes_per_s emulates a link on the cpu backend only; "
                             "on cuda the real PCIe/NVLink speed applies")
        return CudaTransferEngine("cuda" if device is None else device)
    raise ValueError(f"unknown transfer backend {backend!r}; choose one of {BACKENDS}")
