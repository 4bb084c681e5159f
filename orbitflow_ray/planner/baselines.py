"""Adaptive baselines from the paper's evaluation: one placement for the whole batch, re-chosen
before every step from the batch's next-step KV size. No plan window, no Pause-Resume: when even
the largest offload does not fit, the scheduler's swap preemption covers it.

- `flexgen-plus` (FlexGen+): FlexGen's offload fraction made capacity-aware: the smallest fraction
  f in {0, 1/L, ..., 1} whose device KV holds the batch, layers spread as in `static-uniform`.
- `select-n` (SLO-aware offloading, "Select-N"): one prefetch distance, tuned per iteration: the
  most offload whose predicted step time still meets the tightest SLO in the batch (spare slack
  buys device memory, greedily); when none meets it, the fastest distance that fits.
"""

from __future__ import annotations

import abc

from orbitflow_ray.costmodel import OnlineCostModel
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner.base import (CapacityView, KVPolicy, PlacementPlan, RequestView,
                                        register_policy)
from orbitflow_ray.planner.orbitflow import tiers_for_distance
from orbitflow_ray.planner.problem import (PAPER_DISTANCES, SLO_RTOL, PlanInputs, PlanRequest,
                                           step_time)
from orbitflow_ray.planner.static import uniform_placement


def next_step_blocks(views: list[RequestView], block_size: int) -> int:
    """Blocks one device layer of every request in `views` holds after the next step."""
    return sum(-(-(v.num_tokens + 1) // block_size) for v in views)


def device_layers(tiers: list[Tier]) -> int:
    return list(tiers).count(Tier.DEVICE)


class BatchUniformPolicy(KVPolicy):
    """One placement for every running request, re-chosen at admission and before every step."""

    def __init__(self, num_layers: int, cost_model: OnlineCostModel | None = None, slo_s: float = 0.5,
                 **options) -> None:
        super().__init__(num_layers, cost_model=cost_model, slo_s=slo_s, **options)
        self.counters = {"replans": 0, "placements": 0, "admit_refused": 0, "over_capacity": 0}

    @abc.abstractmethod
    def choose(self, views: list[RequestView], cap: CapacityView) -> list[Tier] | None:
        """The placement for every request in `views`; None when no candidate fits the device."""

    def propose(self, req: RequestView, running: list[RequestView], cap: CapacityView
                ) -> PlacementPlan | None:
        """The batch's placement re-chosen with `req` in it; None when no candidate fits."""
        views = running + [req]
        tiers = self.choose(views, cap)
        if tiers is None:
            self.counters["admit_refused"] += 1
            return None
        return self._plan(views, tiers, always=req.request_id)

    def admit(self, req: RequestView, running: list[RequestView], cap: CapacityView
              ) -> PlacementPlan | None:
        plan = super().admit(req, running, cap)
        if plan is not None:
            self.counters["placements"] += len(plan.placements)
        return plan

    def replan(self, running: list[RequestView], cap: CapacityView) -> PlacementPlan | None:
        if not running:
            return None
        self.counters["replans"] += 1
        tiers = self.choose(running, cap)
        if tiers is None:  # the largest offload uses the least device KV; preemption does the rest
            self.counters["over_capacity"] += 1
            tiers = self.place_new(running[0], cap)
        plan = self._plan(running, tiers)
        self.counters["placements"] += len(plan.placements)
        return plan if plan.placements else None

    def _plan(self, views: list[RequestView], tiers: list[Tier], always: str | None = None
              ) -> PlacementPlan:
        """Placements for the requests not already at `tiers` (and always for `always`)."""
        return PlacementPlan({v.request_id: list(tiers) for v in views
                              if v.request_id == always or v.placement is None or list(v.placement) != tiers})

    def fits(self, tiers: list[Tier], views: list[RequestView], cap: CapacityView) -> bool:
        return device_layers(tiers) * next_step_blocks(views, cap.block_size) <= cap.device_total_blocks

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), **self.counters}


@register_policy
class FlexGenPlus(BatchUniformPolicy):
    """FlexGen+: one offload fraction for the batch, the smallest that fits, re-chosen every step."""

    name = "flexgen-plus"

    def __init__(self, num_layers: int, cost_model: OnlineCostModel | None = None, slo_s: float = 0.5,
                 **options) -> None:
        super().__init__(num_layers, cost_model, slo_s, **options)
        self.fraction = 0.0

    def place_new(self, req: RequestView, cap: CapacityView) -> list[Tier]:
        return [Tier.HOST] * self.num_layers

    def choose(self, views: list[RequestView], cap: CapacityView) -> list[Tier]:
        """The smallest fraction that fits; f = 1 needs no device blocks, so one always does."""
        L = self.num_layers
        for k in range(L + 1):
            tiers = uniform_placement(L, k / L)
            if self.fits(tiers, views, cap):
                self.fraction = k / L
                return tiers
        raise AssertionError("unreachable: all layers on host needs no device blocks")

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "offload_fraction": self.fraction}


@register_policy
class SelectN(BatchUniformPolicy):
    """Select-N: one offload interval for the batch, the most offload that still meets the SLO."""

    name = "select-n"

    def __init__(self, num_layers: int, cost_model: OnlineCostModel | None = None, slo_s: float = 0.5,
                 distances: tuple[int, ...] | None = None, **options) -> None:
        super().__init__(num_layers, cost_model, slo_s, **options)
        # the research code's set: all-host (d = 0) is OrbitFlow's addition, not Select-N's
        ds = PAPER_DISTANCES + (num_layers,) if distances is None else tuple(distances)
        if not ds or any(int(d) != d or d < 1 for d in ds):
            raise ValueError(f"distances must be integers >= 1, got {ds}")
        self.distances = tuple(sorted({min(int(d), num_layers) for d in ds}))
        self.distance = self.distances[-1]
        self.counters["slo_misses"] = 0

    def place_new(self, req: RequestView, cap: CapacityView) -> list[Tier]:
        return tiers_for_distance(self.distances[0], self.num_layers)

    def inputs(self, views: list[RequestView], cap: CapacityView) -> PlanInputs:
        """The planner's inputs, built as `orbitflow_solve.SolveLoop.inputs` builds them (Token-Deposit
        credit aside)."""
        a, b = self.cost.model.decode_layer_coeffs(len(views))
        reqs = tuple(PlanRequest(v.request_id, max(1, v.num_tokens), v.max_new_tokens_left,
                                 v.slo_s or self.default_slo_s) for v in views)
        return PlanInputs(reqs, self.num_layers, cap.block_bytes // cap.block_size,
                          cap.device_total_blocks * cap.block_bytes, self.cost.model.link_bytes_per_s,
                          a, b, self.distances, block_size=cap.block_size,
                          copy_compute_s_per_byte=self.cost.model.copy_compute_s_per_byte)

    def choose(self, views: list[RequestView], cap: CapacityView) -> list[Tier] | None:
        fitting = {d: tiers for d in self.distances
                   if self.fits(tiers := tiers_for_distance(d, self.num_layers), views, cap)}
        if not fitting:
            return None
        inputs = self.inputs(views, cap)
        slo = min(v.slo_s or self.default_slo_s for v in views)
        t = {d: step_time(inputs, [d] * len(views)) for d in fitting}
        on_time = [d for d in fitting if t[d] <= slo * (1 + SLO_RTOL)]
        if on_time:  # the least device KV; among equals, the fastest
            d = min(on_time, key=lambda d: (device_layers(fitting[d]), t[d], d))
        else:  # the fastest; among equals, the least device KV
            self.counters["slo_misses"] += 1
            d = min(fitting, key=lambda d: (t[d], device_layers(fitting[d]), d))
        self.distance = d
        return fitting[d]

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "distance": self.distance}
