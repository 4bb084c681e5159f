"""The placement solvers a planning policy can run, by name (enum + registry).

- "fast": `fastpath.FastPlanner`, the certified heuristic with deterministic (counted) budgets.
  What a worker runs on its decode thread and on its solve-ahead thread.
- "cvxpy-highs": `ilp_compact.CompactIlpPlanner`, the fast plan improved by the compact placement
  ILP in cvxpy, solved by HiGHS (its LP relaxation, a primal heuristic from the LP's face
  (`ilp_targets`), a Lagrangian bound (`ilp_lagrange`), then a chain-restricted MIP only when that
  plan is not proven; T proven within `ilp_compact.CENTRAL_REL_GAP` (1e-3) of the optimum when its
  node budgets allow: OPTIMAL, else FEASIBLE; never worse than the
  fast plan). What the central planner runs for the workers' window and drift re-plans. Imports
  cvxpy on first use only.
- "uniform": `uniform.UniformPlanner`, one distance for the whole batch (an ablation).

Every solver takes `PlanInputs` and returns a `Plan` whose `solver` field names what produced it,
`seed(distances)` warm-starts its next solve from a placement (request id -> distance),
`set_deadline(at)` bounds its wall-clock part (only "cvxpy-highs" has one: past the deadline it
returns the fast plan; the others count their budgets and ignore it), and `stats` counts how its
solves were settled.
"""

from __future__ import annotations

import enum
from typing import Protocol

from orbitflow_ray.planner.problem import Plan, PlanInputs


class PlacementSolver(Protocol):
    name: str
    stats: dict[str, int]  # how its solves were settled (counts; names per solver)

    def solve(self, inputs: PlanInputs) -> Plan: ...

    def seed(self, distances: dict[str, int]) -> None: ...

    def set_deadline(self, at: float | None) -> None: ...  # time.perf_counter(); None: no deadline


class SolverKind(str, enum.Enum):
    FAST = "fast"
    CVXPY_HIGHS = "cvxpy-highs"
    UNIFORM = "uniform"


def make_solver(kind: str | SolverKind) -> PlacementSolver:
    """A fresh solver of this kind; ValueError names the known kinds."""
    try:
        kind = SolverKind(kind)
    except ValueError:
        raise ValueError(f"unknown placement solver {kind!r}; choose one of "
                         f"{[k.value for k in SolverKind]}") from None
    if kind is SolverKind.FAST:
        from orbitflow_ray.planner.fastpath import FastPlanner
        return FastPlanner()
    if kind is SolverKind.CVXPY_HIGHS:
        from orbitflow_ray.planner.ilp_compact import CompactIlpPlanner  # cvxpy: heavy, central only
        return CompactIlpPlanner()
    from orbitflow_ray.planner.uniform import UniformPlanner
    return UniformPlanner()
