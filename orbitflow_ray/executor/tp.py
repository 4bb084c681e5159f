"""The driver side of tensor parallelism: one plan out to every shard, one step result back.

    executor = TPExecutor(RayShardGroup(config, device_blocks, host_blocks))  # or make_tp_executor
    result = executor.execute(scheduler_output)  # a StepResult, like ModelRunner.execute

The scheduler, tier manager, planner and cost model stay with the engine (the driver) and place
each request's layers once for all shards; this class stands where `ModelRunner` stands for one
device. It reads like one runner to the engine: `execute` (one StepResult: rank 0's tokens, the
slowest shard's stall, rank 0's bytes and link seconds), `store.staging_bytes`, and a `transfer`
view whose counters are one shard's (every shard moves the same blocks of the same size, its own
slice of them; `shard_bytes_moved` has each shard's).
Ray-free: a `ShardGroup` carries the calls (`ray_shards.RayShardGroup` for processes in a Ray
placement group; `LocalShardGroup` for one in-process shard).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Protocol

from orbitflow_kernels import Direction
from orbitflow_ray.config import EngineConfig
from orbitflow_ray.executor.shard import ShardResult, ShardWorker
from orbitflow_ray.kv.plan import SchedulerOutput, StepResult


class ShardGroup(Protocol):
    size: int

    def call(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every shard at once; their results in rank order (raises if one fails)."""

    def close(self) -> None: ...


class LocalShardGroup:
    """In-process shards called one after another: only a group of one (collectives would block)."""

    def __init__(self, workers: list[ShardWorker]) -> None:
        if len(workers) != 1:
            raise ValueError(f"LocalShardGroup runs one shard in-process, got {len(workers)}")
        self.workers, self.size = workers, 1

    def call(self, method: str, *args: Any) -> list[Any]:
        return [getattr(w, method)(*args) for w in self.workers]

    def close(self) -> None:
        self.call("close")


class _StoreView:
    """The store attribute the engine reads, over the last step's shard results."""

    def __init__(self) -> None:
        self.staging_bytes = 0  # rank 0's (every shard stages the same blocks)


class _LinkView:
    """The transfer-engine counters the engine reads (one shard's link), and close()."""

    def __init__(self, executor: TPExecutor) -> None:
        self._executor = executor

    @property
    def bytes_moved(self) -> dict[Direction, int]:
        return self._executor.shard_bytes_moved[0]

    @property
    def busy_seconds(self) -> dict[Direction, float]:
        return self._executor.shard_busy_seconds[0]

    def close(self) -> None:
        self._executor.close()


class TPExecutor:
    def __init__(self, group: ShardGroup) -> None:
        self.group = group
        self.size = group.size
        self.store = _StoreView()
        self.transfer = _LinkView(self)
        self.shard_bytes_moved: list[dict[Direction, int]] = [{} for _ in range(group.size)]
        self.shard_busy_seconds: list[dict[Direction, float]] = [{} for _ in range(group.size)]
        self.last_num_all_reduces = 0  # per shard, in the last step
        self._closed = False

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one plan on every shard: rank 0's sampled tokens (and logprobs, set on out.seqs), the
        wall time of the whole group call, the slowest shard's stall (the step waits for every
        shard), rank 0's bytes and link seconds."""
        t0 = time.perf_counter()
        results: list[ShardResult] = self.group.call("execute", for_shards(out))
        wall = time.perf_counter() - t0
        first = results[0]
        for seq in out.seqs:
            if seq.request_id in first.logprobs:
                seq.logprobs = first.logprobs[seq.request_id]
        self.shard_bytes_moved = [r.bytes_moved for r in results]
        self.shard_busy_seconds = [r.busy_seconds for r in results]
        self.store.staging_bytes = first.staging_bytes
        self.last_num_all_reduces = first.num_all_reduces
        return replace(first.step, wall_s=wall, stall_s=max(r.step.stall_s for r in results))

    def describe(self) -> list[dict[str, int]]:
        """Each shard's `ShardWorker.describe()`, in rank order."""
        return self.group.call("describe")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.group.close()


def for_shards(out: SchedulerOutput) -> SchedulerOutput:
    """The plan as shards read it, smaller to send each step: table deltas but not the live tables
    (a shard's block tables are built from deltas alone, `ShardWorker`), and the token histories
    only of requests whose logits the sampler edits (penalties, min_tokens). out is not changed."""
    if not out.seqs:
        return out
    seqs = [replace(s, table=[], prompt_token_ids=s.prompt_token_ids if s.sampling_params.changes_logits else [],
                    output_token_ids=s.output_token_ids if s.sampling_params.changes_logits else [])
            for s in out.seqs]
    return replace(out, seqs=seqs)


def make_tp_executor(config: EngineConfig, device_blocks: int, host_blocks: int) -> TPExecutor:
    """config.tensor_parallel_size shard actors in one Ray placement group (Ray imported here only)."""
    from orbitflow_ray.executor.ray_shards import RayShardGroup

    return TPExecutor(RayShardGroup(config, device_blocks, host_blocks))
