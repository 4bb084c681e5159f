"""One prefetch distance for the whole batch: the `orbitflow-uniform` ablation's solver.

Same model, same lexicographic objective (violations, T, longest window) as the per-request
planners, but the search space is the K uniform placements, so it is enumerated exactly.
"""

from __future__ import annotations

from orbitflow_ray.planner.problem import (Plan, PlanInputs, device_bytes, late_requests,
                                           search_windows, step_time)


class UniformPlanner:
    name = "uniform"

    def solve(self, inputs: PlanInputs) -> Plan:
        R = len(inputs.requests)

        def solve_at(window: int) -> tuple[list[int], bool]:
            best: tuple[tuple[int, float], list[int]] | None = None
            for d in inputs.distances:
                choice = [d] * R
                if device_bytes(inputs, choice, window) > inputs.device_capacity_bytes:
                    continue
                T = step_time(inputs, choice)
                key = (len(late_requests(inputs, T, window)), T)
                if best is None or key < best[0]:
                    best = (key, choice)
            assert best is not None, "search_windows only asks for capacity-feasible windows"
            return best[1], True

        return search_windows(inputs, solve_at, self.name)
