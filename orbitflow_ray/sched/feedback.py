"""Runtime feedback, one code path for both executors: what a step measured (the engine) or
predicted (the simulator) goes to the online cost model and to the policy's drift detector."""

from __future__ import annotations

from orbitflow_ray.costmodel import OnlineCostModel, StepSample
from orbitflow_ray.planner.base import KVPolicy, StepStats
from orbitflow_ray.kv.plan import SchedulerOutput


def feed_back(out: SchedulerOutput, wall_s: float, now: float, cost: OnlineCostModel, policy: KVPolicy,
              h2d_bytes: int = 0, h2d_busy_s: float = 0.0, stall_s: float | None = None,
              d2h_bytes: int = 0) -> None:
    if not out.seqs:
        return
    ctx = sum(seq.start_pos for seq in out.seqs)
    decodes = sum(1 for seq in out.seqs if len(seq.token_ids) == 1)
    cost.observe(StepSample(wall_s, ctx, out.num_batched_tokens, h2d_bytes, h2d_busy_s, stall_s, d2h_bytes))
    policy.observe(StepStats(out.step_id, wall_s, tuple(s.request_id for s in out.seqs), ctx,
                             out.num_batched_tokens, decodes, h2d_bytes, h2d_busy_s, now))
