"""One tensor-parallel shard's worker core, Ray-free: its model slice, its KV store, its runner.

    all_reduce = init_distributed("cpu", "tcp://10.0.0.1:29500", world_size=2, rank=0)
    worker = ShardWorker(config, rank=0, device_blocks=64, host_blocks=256, all_reduce=all_reduce)
    result = worker.execute(scheduler_output)  # ShardResult; every shard gets the same plan, in order

A shard loads its own weights (`model.tp_loader.load_shard_weights`), so no weights travel between
processes: from a safetensors directory it reads only its slice of each split tensor; the built-in
GGUF and other sources are loaded whole and then sliced (`model.tp.shard_weights`). Its KV store
holds its slice of every layer's KV (its KV heads) in both tiers, with the same block ids as every
other shard: the driver's tier manager places each request's layers once for all shards, and each
shard's transfer engine moves its own slice of the blocks a plan moves. Rank 0 alone computes
logits and samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch

from orbitflow_kernels import Direction, make_transfer_engine
from orbitflow_ray.config import EngineConfig
from orbitflow_ray.kv.block_table import BlockTables
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.kv.store import KVStore
from orbitflow_ray.model.llama import AllReduceFn, LlamaModel
from orbitflow_ray.model.loader import load_spec
from orbitflow_ray.model.runner import ModelRunner
from orbitflow_ray.model.tp import TPShard
from orbitflow_ray.model.tp_loader import load_shard_weights
from orbitflow_ray.outputs import TokenLogprobs
from orbitflow_ray.kv.plan import SchedulerOutput, StepResult


def init_distributed(backend: str, init_method: str, world_size: int, rank: int,
                     timeout_s: float = 600.0) -> AllReduceFn:
    """Join the shards' torch.distributed group (NCCL on 'cuda', gloo on 'cpu') and return its
    in-place sum all-reduce. Blocks until all `world_size` ranks have joined."""
    import torch.distributed as dist

    if backend == "cuda":
        torch.cuda.set_device(0)  # the one GPU its placement-group bundle gave this process
    dist.init_process_group("nccl" if backend == "cuda" else "gloo", init_method=init_method,
                            world_size=world_size, rank=rank, timeout=timedelta(seconds=timeout_s))

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t)
    return all_reduce


@dataclass(slots=True)
class ShardResult:
    """What one shard reports after a step: its runner's StepResult (sampled tokens on rank 0 only,
    {} elsewhere; this shard's stall, bytes and link seconds in this step), and cumulative counters
    since the shard started."""

    rank: int
    step: StepResult
    logprobs: dict[str, TokenLogprobs]  # for requests that asked for logprobs; rank 0 only
    num_all_reduces: int  # issued by this step's forward (2 per layer when it computed)
    staging_bytes: int
    bytes_moved: dict[Direction, int] = field(default_factory=dict)
    busy_seconds: dict[Direction, float] = field(default_factory=dict)


class ShardWorker:
    """Shard `rank` of `config.tensor_parallel_size`, with per-shard KV pools of device_blocks and
    host_blocks blocks (each block holds this shard's KV heads of block_size tokens of one layer)."""

    def __init__(self, config: EngineConfig, rank: int, device_blocks: int, host_blocks: int,
                 all_reduce: AllReduceFn | None = None) -> None:
        dtype = getattr(torch, config.dtype)
        spec = load_spec(config.model)
        self.rank = rank
        self.shard = TPShard(spec, config.tensor_parallel_size, rank)
        weights = load_shard_weights(config.model, self.shard, dtype, config.seed)
        self.transfer = make_transfer_engine(config.backend, bandwidth_bytes_per_s=config.link_bandwidth_bytes_per_s,
                                             prefault_device=config.prefault_device_kv)
        store = KVStore(self.transfer, device_blocks, host_blocks, config.block_size, self.shard.num_kv_heads,
                        spec.head_dim, dtype, config.prefetch_depth)
        # Made now, not from the first plan's live tables, which `executor.tp.for_shards` leaves out.
        store.tables = BlockTables(spec.num_layers, store.pools[Tier.DEVICE].device)
        self.runner = ModelRunner(LlamaModel(spec, weights, self.transfer.device, self.shard, all_reduce), store)
        self.runner.samples = rank == 0

    def execute(self, out: SchedulerOutput) -> ShardResult:
        before = self.runner.model.num_all_reduces
        step = self.runner.execute(out)
        logprobs = {s.request_id: s.logprobs for s in out.seqs if s.logprobs is not None}
        return ShardResult(self.rank, step, logprobs, self.runner.model.num_all_reduces - before,
                           self.runner.store.staging_bytes, self.transfer.bytes_moved, self.transfer.busy_seconds)

    def describe(self) -> dict[str, int]:
        """This shard's heads, its weight bytes, and the bytes of one block of each of its KV pools
        (tests, bench)."""
        pools = self.runner.store.pools
        return {"rank": self.rank, "num_heads": self.shard.num_heads, "num_kv_heads": self.shard.num_kv_heads,
                "intermediate_size": self.shard.intermediate_size, "weight_bytes": self.runner.model.weight_bytes(),
                **{f"{tier.name.lower()}_block_bytes": pool[0].numel() * pool.element_size()
                   for tier, pool in pools.items()},
                "num_all_reduces": self.runner.model.num_all_reduces}

    def close(self) -> None:
        self.transfer.close()
