"""Executors the engine drives: tensor-parallel shard groups (one device needs only ModelRunner)."""

from orbitflow_ray.executor.shard import ShardResult, ShardWorker
from orbitflow_ray.executor.tp import LocalShardGroup, ShardGroup, TPExecutor, make_tp_executor

__all__ = ["LocalShardGroup", "ShardGroup", "ShardResult", "ShardWorker", "TPExecutor", "make_tp_executor"]
