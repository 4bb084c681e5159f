"""One prefetch distance for the whole batch: the `orbitflow-uniform` ablation's solver.

Same model, same lexicographic objective (violations, T, link bytes, longest window) as the
per-request planners, but the search space is the K uniform placements, so it is enumerated exactly.
"""

from __future__ import annotations

from orbitflow_ray.planner.problem import (Plan, PlanInputs, device_bytes, late_requests, link_bytes,
                                           search_windows, step_time, tie_limit)


class UniformPlanner:
    name = "uniform"

    def __init__(self) -> None:
        self.stats: dict[str, int] = {}

    def seed(self, distances: dict[str, int]) -> None:
        """Nothing to warm-start: the K uniform placements are enumerated."""

    def set_deadline(self, at: float | None) -> None:
        """No wall clock here: the budget is counted (`PlacementSolver`)."""

    def solve(self, inputs: PlanInputs) -> Plan:
        R = len(inputs.requests)

        def solve_at(window: int) -> tuple[list[int], bool]:
            scored = []  # (violations, T, d) of every uniform placement that fits
            for d in inputs.distances:
                if device_bytes(inputs, [d] * R, window) <= inputs.device_capacity_bytes:
                    T = step_time(inputs, [d] * R)
                    scored.append((len(late_requests(inputs, T, window)), T, d))
            assert scored, "search_windows only asks for capacity-feasible windows"
            late, T, _ = min(scored)
            limit = tie_limit(inputs, window, T)
            ties = [d for n, t, d in scored if n == late and t <= limit]
            return [min(ties, key=lambda d: (link_bytes(inputs, [d] * R), -d))] * R, True

        return search_windows(inputs, solve_at, self.name)
