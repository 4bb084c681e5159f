"""The engine's prefetch issue rule, defined once for the three places that must agree on it: the KV
store that issues the copies (`kv/store.py`), the simulator's executor that times them
(`sim/executor.py`) and the planner's model of the engine's step (`planner/problem.engine_step_time`)."""

from __future__ import annotations

import bisect
from typing import Sequence


def issue_limit(host_order: Sequence[int], layer: int, depth: int) -> int:
    """How many of the step's host layers (`host_order`: ascending, the union over the batch) have
    their copies issued before `layer` computes: every one up to the (`depth` + 1)-th host layer at or
    after `layer`, so each copy overlaps the compute of up to `depth` host layers before its own."""
    return min(bisect.bisect_left(host_order, layer) + depth + 1, len(host_order))
