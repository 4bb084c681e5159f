"""Pause-for-SLO (`pause.SloPauseSearch`, run by `OrbitFlow._pause_for_slo`) is bounded by counts: at most `slo_pause_max_trials`
trial solves per re-plan, none once the pauses' own misses reach the best, none for a trial its
certain misses settle; when the bound covers the search it decides as the unbounded one does.

The batches here have no device KV (capacity 0): every request streams all-host, the only
placement, so each trial's step time T is `step_time` of the all-host placement and the
expected decisions follow from it by hand (the policy judges its plans by that model,
`link_model="edf"`: what is tested here is the search, not the link model)."""

import pytest

from orbitflow_ray.costmodel import CostModel, OnlineCostModel
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner import make_policy
from orbitflow_ray.planner.admission import batch_plan_inputs
from orbitflow_ray.planner.base import CapacityView, RequestView
from orbitflow_ray.planner.orbitflow import SLO_PAUSE_MAX_TRIALS
from orbitflow_ray.planner.problem import ALL_HOST, certain_late, step_time

L = 4
NO_DEVICE = CapacityView(L, 4, 100, 0, 0, 10 ** 6, 10 ** 6)  # 25 bytes per token per layer, no device KV


def policy(compute_a_s=1e-3, **kw):
    """1 ms per layer (no per-token term) and a 1 MB/s link: T grows with the batch's bytes."""
    cost = OnlineCostModel(CostModel(L, compute_a_s, 0.0, 0.0, 1e6))
    return make_policy("orbitflow", L, cost_model=cost, solve_ahead=False, windows=(16,), link_model="edf", **kw)


def views(tokens, slo_s):
    """Requests in decode (16 tokens left), all-host, arrived in list order, one SLO for all."""
    return [RequestView(f"r{i}", n, n, n + 16, float(i), (Tier.HOST,) * L, 1, slo_s) for i, n in enumerate(tokens)]


class Counting:
    """The policy's solver, its solve calls counted."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def solve(self, inputs):
        self.calls += 1
        return self.inner.solve(inputs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def replan(p, batch):
    p.solver = Counting(p.solver)
    change = p.replan(batch, NO_DEVICE)
    return change.pause, p.plan, p.solver.calls


def all_host_T(p, batch):
    return step_time(batch_plan_inputs(batch, NO_DEVICE, L, p.cost, 0.5, (16,)), [ALL_HOST] * len(batch))


def test_small_batch_decides_as_the_unbounded_search():
    """T is 44 ms with all five, 34 ms without r0, 25 ms without r0 and r1: at a 30 ms SLO the first
    pause leaves 1 + 4 misses (no gain), the second 2 + 0; a third would cost 3 >= 2, so the search
    stops after two trials. Unbounded and default-bounded agree; a cap of one trial stops on the
    plateau and pauses nobody."""
    batch = views([100, 90, 80, 70, 60], 0.030)
    p = policy()
    assert [round(all_host_T(p, batch[k:]), 4) for k in range(3)] == [0.044, 0.034, 0.025]
    for cap in (SLO_PAUSE_MAX_TRIALS, 1000):
        p = policy(slo_pause_max_trials=cap)
        paused, plan, calls = replan(p, batch)
        assert paused == ["r0", "r1"] and sorted(plan.distances) == ["r2", "r3", "r4"] and not plan.violations
        assert calls == 1 + 2 and p.counters["slo_pause_trials"] == 2 and p.counters["slo_pauses"] == 2
        assert p.counters["slo_pause_capped"] == 0
    p = policy(slo_pause_max_trials=1)
    paused, plan, calls = replan(p, batch)
    assert paused == [] and plan.violations == {"r0", "r1", "r2", "r3", "r4"} and calls == 2
    assert p.counters["slo_pause_capped"] == 1 and p.counters["slo_pause_trials_max"] == 1


def test_trials_that_compute_alone_settles_are_not_solved():
    """4 ms of compute per step (4 layers x 1 ms) is over every 3 ms SLO: each trial's misses are
    certain, pauses plus the rest, 5 = the plan's own, so no trial is solved and nobody is paused."""
    batch = views([100, 90, 80, 70, 60], 0.003)
    p = policy()
    assert certain_late(batch_plan_inputs(batch, NO_DEVICE, L, p.cost, 0.5, (16,))) == {v.request_id for v in batch}
    paused, plan, calls = replan(p, batch)
    assert paused == [] and len(plan.violations) == 5 and calls == 1
    assert p.counters["slo_pause_skipped"] == 4 and p.counters["slo_pause_trials"] == 0


@pytest.mark.parametrize("meet, bounded_pauses", [(20, 12), (2, 31)])
def test_a_batch_where_all_miss_runs_at_most_the_bound(meet, bounded_pauses):
    """32 equal requests and an SLO that only `meet` of them together meet: every pause leaves the
    misses at 32 until `meet` are left (32 - meet pauses and no late request). The unbounded search
    solves 32 - meet trials to find that. The bound solves 8: k = 1, 2, 3, 4, then 8, 16 (16 left)
    and, for meet = 2, 31; the doubling that pays is bisected on the budget left: 12 (20 left: the
    unbounded search's answer) and 10 for meet = 20, 23 for meet = 2, where 31 pauses (31 misses)
    stay, one more than the unbounded search's 30."""
    p = policy()
    meets, late = all_host_T(p, views([60] * meet, 1.0)), all_host_T(p, views([60] * (meet + 1), 1.0))
    batch = views([60] * 32, (meets + late) / 2)
    bounded, unbounded = policy(), policy(slo_pause_max_trials=1000)
    paused, plan, calls = replan(bounded, batch)
    assert calls == 1 + SLO_PAUSE_MAX_TRIALS and bounded.counters["slo_pause_trials_max"] == SLO_PAUSE_MAX_TRIALS
    assert paused == [f"r{i}" for i in range(31, 31 - bounded_pauses, -1)] and not plan.violations
    assert bounded.counters["slo_pause_capped"] == 1
    paused, plan, calls = replan(unbounded, batch)
    assert calls == 1 + 32 - meet and len(paused) == 32 - meet and not plan.violations
    assert unbounded.counters["slo_pause_capped"] == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_slo_pause_max_trials_is_validated(bad):
    with pytest.raises(ValueError, match="slo_pause_max_trials"):
        policy(slo_pause_max_trials=bad)
