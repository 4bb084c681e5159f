"""One step of serving, the same for the engine and the simulator: schedule -> execute -> feed back
-> update (nano-vllm's step; vLLM v1's EngineCore.step over its executor).

    loop = StepLoop(scheduler, runner, cost, policy)  # the engine: a ModelRunner on the wall clock
    step = loop.step()  # Step(out, result, updated, now)

Only the executor and the clock differ. The engine's executors (`ModelRunner`, the tensor-parallel
`TPExecutor`) run the plan and measure it; the simulator's `SimExecutor` predicts it, and its clock
is virtual (`advance` adds the predicted wall time). Everything else (the scheduler, the policy, the
online cost model and what they are fed) is one code path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from orbitflow_ray.costmodel import OnlineCostModel
from orbitflow_ray.kv.plan import SchedulerOutput, StepResult
from orbitflow_ray.planner.base import KVPolicy
from orbitflow_ray.request import Request
from orbitflow_ray.sched.feedback import feed_back
from orbitflow_ray.sched.scheduler import Scheduler


class Executor(Protocol):
    """Runs (or times) one plan: its moves, its forgotten requests, its forward pass."""

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Every plan must reach the executor, in order, empty ones included (table deltas and
        finished request ids are incremental)."""


@dataclass(frozen=True, slots=True)
class Step:
    out: SchedulerOutput
    result: StepResult
    updated: list[Request]  # requests that got a token in this step
    now: float  # the clock when the step ended: the sampled tokens' timestamp


def wall_clock(wall_s: float) -> float:
    """The engine's clock: the step's own measure is in its StepResult, the time is real."""
    return time.perf_counter()


class StepLoop:
    def __init__(self, scheduler: Scheduler, executor: Executor, cost: OnlineCostModel, policy: KVPolicy,
                 advance: Callable[[float], float] = wall_clock,
                 schedule: Callable[[], SchedulerOutput] | None = None, skip_empty: bool = False) -> None:
        """advance(wall_s): the clock after a step that took wall_s seconds. schedule: what makes the
        plan (default scheduler.schedule; the simulator's also charges planning time). skip_empty:
        a plan with nothing to run or move is neither executed nor fed back (the simulator then
        jumps its clock to the next arrival); the engine runs it, to forget finished requests."""
        self.scheduler = scheduler
        self.executor = executor
        self.cost = cost
        self.policy = policy
        self.advance = advance
        self._schedule = schedule
        self.skip_empty = skip_empty

    def step(self) -> Step | None:
        """One step; None when the plan was empty and skip_empty is set."""
        # looked up per step, as the executor's execute is: a wrapper set on the scheduler later
        # (a test's or a bench's instrumentation) is the one that runs
        out = self._schedule() if self._schedule is not None else self.scheduler.schedule()
        if self.skip_empty and out.is_empty:
            return None
        result = self.executor.execute(out)
        now = self.advance(result.wall_s)
        feed_back(out, result.wall_s, now, self.cost, self.policy, result.h2d_bytes, result.h2d_busy_s,
                  result.stall_s, result.d2h_bytes)
        return Step(out, result, self.scheduler.update_from_output(out, result.sampled, now), now)
