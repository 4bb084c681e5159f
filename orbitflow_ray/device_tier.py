"""Sizing the device tier: its byte budget, and how it splits into KV blocks and staging.

The budget, when `device_kv_bytes` is None, follows vLLM:
  * cuda: `gpu_memory_utilization` of the GPU's memory, less what is in use (other processes, our
    weights once loaded) and an estimate of one step's activations (vLLM profiles a forward pass
    instead);
  * cpu: 4 GiB, vLLM's CPU KV cache space when `VLLM_CPU_KVCACHE_SPACE` is unset, capped at half the
    memory available now. The CPU backend maps tiers lazily (`orbitflow_kernels.cpu.lazy_zeros`), so
    the budget costs RAM only as KV fills it; `EngineConfig.prefault_device_kv` writes the device
    tier at start instead, as vLLM zeroes its CPU KV cache.

Staging (host-resident layers copied in to compute, `kv/store.py`) lives inside that budget when
`staging_kv_bytes` is set, or whenever the budget is sized here: it is split into prefetch_depth + 1
staging slots and a prompt region (`kv/prompt_stage.py`) of what is left, about one slot. The
scheduler never stages more than a slot per layer and step, and the tier manager reports the
reservation to the planner (`CapacityView.staging_blocks`). With an explicit `device_kv_bytes` and no
`staging_kv_bytes`, staging sits outside the budget as before: slots grow to the largest layer slice
seen, and prompts may keep one max_model_len sequence's blocks of every layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from orbitflow_ray.config import EngineConfig

CPU_KV_BYTES = 4 << 30  # vLLM's VLLM_CPU_KVCACHE_SPACE default (4 GiB)


@dataclass(frozen=True, slots=True)
class DeviceTier:
    kv_blocks: int  # device blocks the tier manager hands out for KV
    slot_blocks: int | None  # blocks of one staging slot (None: unbounded, outside the budget)
    prompt_blocks: int  # blocks prompts' host layers may keep across prefill chunks
    staging_blocks: int  # blocks reserved for staging inside the budget (0: outside it)


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not POSIX: trust the rule alone
        return 2 * CPU_KV_BYTES


def auto_device_kv_bytes(config: EngineConfig, weight_bytes: int, activation_bytes: int) -> int:
    """The device tier's budget when `device_kv_bytes` is None (see the module docstring).
    weight_bytes: the model's weights not yet on the GPU; activation_bytes: one step's peak."""
    if config.backend == "cuda":
        free, total = torch.cuda.mem_get_info()
        return int(total * config.gpu_memory_utilization) - (total - free) - weight_bytes - activation_bytes
    return min(CPU_KV_BYTES, _available_ram() // 2)


def size_device_tier(config: EngineConfig, device_bytes: int, block_bytes: int, seq_blocks: int,
                     num_layers: int, auto: bool) -> DeviceTier:
    """Split `device_bytes` into KV blocks and staging. seq_blocks: blocks of one layer of a
    max_model_len sequence, the least a staging slot must hold so that every sequence can run."""
    slots = config.prefetch_depth + 1
    staging = config.staging_kv_bytes
    if staging is None and auto:  # room for the larger of one full-length sequence or 1/8 of the tier
        staging = max((slots + 1) * seq_blocks * block_bytes, device_bytes // 8)
    if staging is None:
        kv = device_bytes // block_bytes
        tier = DeviceTier(kv, None, seq_blocks * num_layers, 0)
    else:
        total = staging // block_bytes
        slot = total // (slots + 1)
        if slot < seq_blocks:
            raise ValueError(f"staging_kv_bytes={staging} gives each of the {slots} staging slots {slot} blocks; "
                             f"a max_model_len sequence needs {seq_blocks} ({(slots + 1) * seq_blocks * block_bytes} "
                             "bytes in all), or lower max_model_len")
        kv = (device_bytes - total * block_bytes) // block_bytes
        tier = DeviceTier(kv, slot, total - slots * slot, total)
    if tier.kv_blocks <= 0:
        raise ValueError(f"device_kv_bytes={device_bytes} cannot hold even one KV block of one layer ({block_bytes} "
                         f"bytes) beside {tier.staging_blocks * block_bytes} bytes of staging")
    return tier
