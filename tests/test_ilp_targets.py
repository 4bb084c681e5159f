"""The central planner's primal heuristic (`planner/ilp_targets.py`): from the LP's face it finds
plans the fast path's basin does not reach, scored exactly, never worse than the plan it is given."""

import numpy as np
import pytest

from orbitflow_ray.planner.fastpath import FastPlanner
from orbitflow_ray.planner.ilp_compact import CompactIlpPlanner
from orbitflow_ray.planner.ilp_targets import TargetSearch
from orbitflow_ray.planner.problem import (PlanInputs, PlanRequest, PlanStatus, evaluate, fits, plan_better,
                                           step_time, window_data)
from test_planner_central import _batch

KVB, BW = 4096, 25e9


def _three_requests() -> PlanInputs:
    """L = 2, each request all on host (d = 0: a host layer's copy overlaps no compute, so it adds
    its whole transfer to the step) or all on device (d = 2). A has 3,000 tokens and grows by 100 in
    the window, B and C 2,000 tokens and grow by 1; the device holds 2 x 4,002 token-layers: B and
    C together (4,002 tokens) or A alone (3,100), not A with either."""
    reqs = [PlanRequest("A", 3000, 100, 1.0), PlanRequest("B", 2000, 1, 1.0), PlanRequest("C", 2000, 1, 1.0)]
    return PlanInputs(reqs, 2, KVB, 2 * 4002 * KVB, BW, 1e-4, 0.0, distances=(0, 2), windows=(32,))


def test_finds_the_optimum_a_descent_from_the_given_plan_misses():
    """Given the plan "A on device, B and C on host" (stall 2 x (B + C) loads), no single move or
    pair of moves that fits lowers the stall (B or C joining A overflows; A leaving adds its load);
    the knapsack start on the whole-step row (host layers per class) puts the requests of the best
    load per device token on device first, B and C, and A on host: stall 2 x A's load, the least of
    the 2^3 placements (checked by `step_time`)."""
    inp = _three_requests()
    planner = FastPlanner(warm_start=False)
    link, load, e, dev, cap = planner._arrays(inp, 32)
    assert list(inp.distances) == [0, 2] and list(dev) == [0, 2]
    given = np.array([1, 0, 0])  # A on device, B and C on host
    c, L = inp.compute_per_layer_s, inp.num_layers
    stall = {ks: step_time(inp, [inp.distances[k] for k in ks]) / c - L
             for ks in np.ndindex(2, 2, 2) if fits(inp, 32, ks)}
    assert stall[(1, 0, 0)] == pytest.approx(2 * (load[1] + load[2]))
    assert min(stall, key=stall.get) == (0, 1, 1)
    assert stall[(0, 1, 1)] == pytest.approx(2 * load[0])
    row = (np.array([2.0, 0.0]), 0.0)  # stall >= 2 * Y_host (here with equality)
    alone = TargetSearch()
    ks, found = alone.search(link, load, e, dev, cap, given, [row], None, None, target=0.0)
    assert ks.tolist() == [1, 0, 0] and found == pytest.approx(stall[(1, 0, 0)])  # stuck: no start but it
    search = TargetSearch()
    ks, found = search.search(link, load, e, dev, cap, given, [row], row, None, target=0.0)
    assert ks.tolist() == [0, 1, 1] and found == pytest.approx(stall[(0, 1, 1)])
    assert search.stats["from_knapsack"] == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_worse_than_the_given_plan_and_always_fits(seed):
    """On serving-like batches, from the fast plan and the compact model's LP: the plan fits
    (exact integers), its stall is `step_time`'s, and it is never above the fast plan's; with a
    misleading row and no LP solution it returns the given plan's stall or less."""
    inp = _batch(32, seed)
    fast_planner = FastPlanner(warm_start=False)
    fast = fast_planner.solve(inp)
    W, c, L = fast.window, inp.compute_per_layer_s, inp.num_layers
    link, load, e, dev, cap = fast_planner._arrays(inp, W)
    given = np.array([inp.distances.index(fast.distances[r.request_id]) for r in inp.requests])
    s_fast = step_time(inp, [inp.distances[k] for k in given]) / c - L
    lp, row, x = CompactIlpPlanner().compiled(inp).relaxation(window_data(inp, W), {"threads": 1, "presolve": "off"})
    for rows, lp_row, lp_x in (([row], row, x), ([(np.zeros(len(dev)), 0.0)], (-np.ones(len(dev)), 0.0), None)):
        ks, found = TargetSearch().search(link, load, e, dev, cap, given, rows, lp_row, lp_x, target=0.0)
        assert fits(inp, W, ks)
        exact = step_time(inp, [inp.distances[k] for k in ks]) / c - L
        assert found == pytest.approx(exact, rel=1e-12) and exact <= s_fast
    assert lp <= exact  # a plan is never below the LP bound


def test_central_plan_proven_by_the_heuristic_without_a_mip():
    """A 32-request batch where the heuristic's plan lies within rel_gap of the LP bound: OPTIMAL
    with no chain MIP, strictly better than the fast plan, and scored exactly."""
    inp = _batch(32, 0)
    ilp = CompactIlpPlanner(fast=FastPlanner(warm_start=False))
    plan, fast = ilp.solve(inp), FastPlanner(warm_start=False).solve(inp)
    assert plan.status is PlanStatus.OPTIMAL and ilp.stats["heuristic_proven"] == 1
    assert ilp.stats["chain_mips"] == 0 and ilp.stats["lp_solves"] == 1
    assert plan_better(inp, plan, fast)
    T, late, dev = evaluate(inp, plan.distances, plan.window)
    assert (T, late, dev) == (plan.predicted_step_s, plan.violations, plan.device_bytes)
    assert dev <= inp.device_capacity_bytes


def test_budget_is_validated():
    with pytest.raises(ValueError, match="rounds"):
        TargetSearch(rounds=0)
    with pytest.raises(ValueError, match="max_exact"):
        TargetSearch(max_exact=0)
