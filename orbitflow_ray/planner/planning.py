"""The planning interface between serving and a KV policy: the plan objects that cross it and the
calls serving makes.

Serving never reaches into a policy: it asks `planning_of(policy)` for its `PlanningPolicy` (None
when the policy does not plan) and then only solves for a batch on another's behalf on the
worker's fitted cost model (the central planner), or attaches a remote solver (a worker with a
central planner). What crosses is a `PlanResult` (the plan and the ids paused to reach it),
wrapped in a versioned `RemotePlan`."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Hashable, Iterator, Protocol, runtime_checkable

from orbitflow_ray.costmodel import CostModel
from orbitflow_ray.planner.base import CapacityView, RequestView
from orbitflow_ray.planner.problem import Plan


@dataclass(frozen=True, slots=True)
class PlanResult:
    """One planning solve: the plan for the requests that stay, and the ids paused to reach it
    (Pause-Resume, in the order they were paused). Unpacks as `plan, paused`."""

    plan: Plan
    paused: tuple[str, ...] = ()

    def __iter__(self) -> Iterator:
        yield self.plan
        yield list(self.paused)


@dataclass(frozen=True, slots=True)
class RemotePlan:
    """The central planner's answer for one worker's predicted batch `key`. `result` is None when
    the planner dropped the request unsolved: its deadline had passed (`expired`) or a newer
    request from the same worker replaced it while it waited (`superseded`)."""

    version: int
    key: Hashable
    result: PlanResult | None
    solve_s: float = 0.0  # the planner's solve time (queueing not included)
    dropped: str | None = None  # None, "expired" or "superseded"


class RemoteSolve(Protocol):
    """Send a predicted batch to the central planner; `budget_s` is how long until the step that
    needs the plan (the planner drops it unsolved past that). Never blocks."""

    def __call__(self, key: Hashable, views: list[RequestView], cap: CapacityView, pinned: frozenset[str],
                 budget_s: float | None) -> Future: ...


@runtime_checkable
class PlanningPolicy(Protocol):
    """What serving may ask of a policy that plans."""

    def solve_for(self, views: list[RequestView], cap: CapacityView, pinned: frozenset[str] = frozenset(),
                  deadline: float | None = None) -> PlanResult:
        """Solve this batch on another's behalf, warm-started from the placements the views carry;
        `deadline` (time.perf_counter()) bounds a wall-clock solver (the central ILP)."""
        ...

    def use_cost_model(self, model: CostModel) -> None:
        """Plan on this fitted model from now on (the central planner: the worker's own fit)."""
        ...

    def attach_remote(self, remote: RemoteSolve | None) -> None:
        """Send speculative (one-or-more-steps-ahead) solves to `remote` instead of the local
        thread; None detaches it."""
        ...


def planning_of(policy: object) -> PlanningPolicy | None:
    """The policy's planning interface, or None for a policy that does not plan."""
    return policy if isinstance(policy, PlanningPolicy) else None
