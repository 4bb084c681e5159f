"""Shard actors in a Ray placement group: the one module outside deployments/ that imports Ray.

    group = RayShardGroup(config, device_blocks=64, host_blocks=256)  # N actors, one bundle each
    results = group.call("execute", scheduler_output)                  # [ShardResult] in rank order

Why here: a worker replica (deployments/) and the offline `LLM` both build an `LLMEngine`, and for
tensor_parallel_size > 1 the engine's executor needs processes, one per GPU, that Ray places
together (a placement group, STRICT_PACK: one node, as NVLink all-reduces need; one GPU per bundle
on a cluster, one CPU here). The module is imported only when an engine asks for more than one shard
(`executor.tp.make_tp_executor`), so nothing else pays for Ray. The actor class is a thin shim over
the Ray-free `ShardWorker`; the group only starts actors, wires their torch.distributed group
(rank 0 names the rendezvous address) and fans calls out. One failed shard fails the call at once
(not after the other shards' collective times out) and marks the group broken: the engine's step
raises, which ends the replica's streams with an error and lets Serve replace the replica.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orbitflow_ray.config import EngineConfig
from orbitflow_ray.executor.shard import ShardWorker, init_distributed


class _ShardActor:
    """The actor shim: builds and drives one ShardWorker."""

    def __init__(self, config: EngineConfig, rank: int, device_blocks: int, host_blocks: int) -> None:
        self.config, self.rank, self.blocks = config, rank, (device_blocks, host_blocks)
        self.worker: ShardWorker | None = None

    def rendezvous(self) -> str:
        """A tcp:// address on this node with a port free now (rank 0 hosts the group's store)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def start(self, init_method: str) -> None:
        size = self.config.tensor_parallel_size
        all_reduce = init_distributed(self.config.backend, init_method, size, self.rank)
        self.worker = ShardWorker(self.config, self.rank, *self.blocks, all_reduce=all_reduce)

    def execute(self, out):
        return self.worker.execute(out)

    def describe(self) -> dict[str, int]:
        return self.worker.describe()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


SHARD_NAME_PREFIX = "orbitflow-tp-shard"


class RayShardGroup:
    """config.tensor_parallel_size shard actors, started and joined before the constructor returns.
    Actors are named `orbitflow-tp-shard-<group>-<rank>` (operators and fault tests find them)."""

    def __init__(self, config: EngineConfig, device_blocks: int, host_blocks: int,
                 start_timeout_s: float = 600.0) -> None:
        self.size = config.tensor_parallel_size
        if not ray.is_initialized():
            ray.init(num_cpus=max(self.size, os.cpu_count() or 1), include_dashboard=False)
        gpu = config.backend == "cuda"
        bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(self.size)], strategy="STRICT_PACK")
        self.broken: str | None = None
        self.actors: list[Any] = []
        try:
            ready, _ = ray.wait([self.pg.ready()], timeout=start_timeout_s)
            if not ready:
                raise RuntimeError(f"no node could place {self.size} bundles of {bundle} for "
                                   f"tensor_parallel_size={self.size} within {start_timeout_s:.0f} s")
            actor = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_ShardActor)
            group = uuid.uuid4().hex[:8]
            self.actors = [actor.options(name=f"{SHARD_NAME_PREFIX}-{group}-{rank}", scheduling_strategy=(
                PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank))).remote(
                config, rank, device_blocks, host_blocks) for rank in range(self.size)]
            init_method = ray.get(self.actors[0].rendezvous.remote(), timeout=start_timeout_s)
            ray.get([a.start.remote(init_method) for a in self.actors], timeout=start_timeout_s)
        except BaseException:
            self._teardown()
            raise

    def call(self, method: str, *args: Any) -> list[Any]:
        if self.broken:
            raise RuntimeError(f"tensor-parallel group is broken: {self.broken}")
        refs = [ray.put(a) for a in args]  # serialised once for all shards
        futures = [getattr(actor, method).remote(*refs) for actor in self.actors]
        pending = list(futures)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done[0])  # a failed shard raises now, not when its peers' collective times out
        except Exception as e:
            self.broken = f"{type(e).__name__} in {method}"
            self._teardown()
            raise
        return ray.get(futures)

    def close(self) -> None:
        if self.actors and not self.broken:
            try:
                ray.get([a.close.remote() for a in self.actors], timeout=30)
            except Exception:
                pass  # an actor that cannot close is killed below anyway
        self.broken = self.broken or "closed"
        self._teardown()

    def _teardown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
