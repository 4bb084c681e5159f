"""Pause-for-SLO (`pause.SloPauseSearch`, run by `SolveLoop._pause_for_slo`) is bounded by counts: at most `slo_pause_max_trials`
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
from orbitflow_ray.planner.admission import batch_plan_inputs, outgrow_wait
from orbitflow_ray.planner.base import CapacityView, RequestView
from orbitflow_ray.planner.orbitflow import SLO_PAUSE_MAX_TRIALS
from orbitflow_ray.planner.pause import pause_breaks_tpot
from orbitflow_ray.planner.problem import ALL_HOST, certain_late, step_time

L = 4
NO_DEVICE = CapacityView(L, 4, 100, 0, 0, 10 ** 6, 10 ** 6)  # 25 bytes per token per layer, no device KV


def policy(compute_a_s=1e-3, pause_cost="miss", **kw):
    """1 ms per layer (no per-token term) and a 1 MB/s link: T grows with the batch's bytes. Every
    pause counts as a miss (`pause_cost` "miss") unless said: the search's bounds are tested."""
    cost = OnlineCostModel(CostModel(L, compute_a_s, 0.0, 0.0, 1e6))
    return make_policy("orbitflow", L, cost_model=cost, solve_ahead=False, windows=(16,), link_model="edf",
                       pause_cost=pause_cost, **kw)


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


def test_pause_breaks_tpot_and_outgrow_wait_by_hand():
    # 100 tokens left at a 10 ms step under a 20 ms SLO: 1 s of slack; 50 steps of 20 ms fit, 51 do not.
    assert not pause_breaks_tpot(100, 50, 0.010, 0.020) and pause_breaks_tpot(100, 51, 0.010, 0.020)
    # 300 + 2t tokens outgrow 400 at t = 51; the next finish (both have 100 left) is 49 steps on.
    a, b = RequestView("a", 200, 200, 100, 0.0, None), RequestView("b", 100, 100, 100, 1.0, None)
    assert outgrow_wait([a, b], 400) == (51, 49)
    # b with 10 left: the pair reaches 318 tokens, then a alone ends at 299: never over 400.
    assert outgrow_wait([a, RequestView("b", 100, 100, 10, 1.0, None)], 400) is None


def test_a_pause_within_its_tpot_slack_is_free():
    """r1 (60 tokens, 10 ms SLO, 15 left) is late beside r0 (100 tokens, 1 s SLO) and on time alone.
    Counting a pause as a miss, pausing r0 costs the one miss it saves: nobody is paused and r1
    runs late. r0 has 10,000 tokens left: waiting r1's 15 steps is far within its slack, so the
    slack rule pauses it for free and r1 meets its SLO. The reverse: both with 10,000 tokens left,
    either one's wait (10,000 steps at its SLO) outruns its slack ((SLO - 4 ms) x 10,000): every
    pause is a miss under both rules, and nobody is paused."""
    H = (Tier.HOST,) * L
    r0 = RequestView("r0", 100, 100, 10_001, 0.0, H, 1, 1.0)
    r1 = RequestView("r1", 60, 60, 16, 1.0, H, 1, 0.010)
    p = policy()
    assert all_host_T(p, [r0, r1]) > 0.010 >= all_host_T(p, [r1])
    paused, plan, _ = replan(policy(pause_cost="miss"), [r0, r1])
    assert paused == [] and plan.violations == {"r1"}
    paused, plan, _ = replan(policy(pause_cost="slack"), [r0, r1])
    assert paused == ["r0"] and sorted(plan.distances) == ["r1"] and not plan.violations
    both_long = [r0, RequestView("r1", 60, 60, 10_001, 1.0, H, 1, 0.010)]
    for cost in ("miss", "slack"):
        paused, plan, _ = replan(policy(pause_cost=cost), both_long)
        assert paused == [] and plan.violations == {"r1"}
    with pytest.raises(ValueError, match="pause_cost must be one of"):
        policy(pause_cost="free")


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
