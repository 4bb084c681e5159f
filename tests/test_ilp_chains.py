"""The central ILP's lazy chain search (`planner/ilp_compact.py`, search="chains"): its LP row is a
valid bound, and its plans agree with HiGHS's branch and bound on the whole compact model."""

import dataclasses

import numpy as np
import pytest

from orbitflow_ray.planner.fastpath import FastPlanner, knapsack_bound
from orbitflow_ray.planner.ilp_compact import CompactIlpPlanner
from orbitflow_ray.planner.problem import PlanStatus, evaluate, fits, plan_better, step_time, window_data
from test_planner_central import _batch


def test_lp_row_bounds_every_placement_and_equals_the_lp():
    """The LP's dual row (m, s): its knapsack minimum is the LP optimum, and m . Y - s is at most
    the exact stall of every placement that fits (random ones and the fast plan)."""
    inp = _batch(16, 3, 32)
    planner = CompactIlpPlanner(fast=FastPlanner(warm_start=False))
    link, load, e, dev, cap = planner.fast._arrays(inp, 32)
    lp, (m, s), x = planner.compiled(inp).relaxation(window_data(inp, 32), planner.lp_options)
    assert x.shape == (16, len(inp.distances)) and np.allclose(x.sum(axis=1), 1.0)
    value = knapsack_bound(load, e.astype(float), dev.astype(float), float(cap), m)[0] - s
    assert value == pytest.approx(lp, rel=1e-6)
    rng = np.random.default_rng(0)
    fast = planner.fast.solve(inp)
    placements = [np.array([inp.distances.index(fast.distances[r.request_id]) for r in inp.requests])]
    placements += [rng.integers(0, len(dev), 16) for _ in range(400)]
    c, L, checked = inp.compute_per_layer_s, inp.num_layers, 0
    for ks in placements:
        if not fits(inp, 32, ks):
            continue
        checked += 1
        stall = step_time(inp, [inp.distances[k] for k in ks]) / c - L
        assert m @ np.bincount(ks, weights=load, minlength=len(dev)) - s <= stall + 1e-9 * (L + stall)
    assert checked >= 20
    # the bound is below the fast plan by at most its certified gap (1 %)
    assert lp <= step_time(inp, [fast.distances[r.request_id] for r in inp.requests]) / c - L


# seed 0: HiGHS's answer there overshoots the capacity row within its default feasibility
# tolerance (the search re-solves with tighter ones); the whole-model MIP takes about 15 s on it
@pytest.mark.parametrize("seed", [pytest.param(0, marks=pytest.mark.slow), 1, 2])
def test_chain_search_agrees_with_branch_and_bound_on_the_compact_model(seed):
    """Three searches of the same model, each proving T within 1e-5 (the chain MIP without the
    Lagrangian bound, the whole-model MIP, and the chain search with it, which proves these
    without a MIP): their step times agree within that, the plans fit and are scored exactly, and
    none is worse than the fast plan."""
    inp = dataclasses.replace(_batch(10, seed, 16, cap_frac=0.7), windows=(32,))
    gap = 1e-5
    chains = CompactIlpPlanner(rel_gap=gap, max_nodes=20_000, max_rounds=8, time_limit_s=60.0,
                               fast=FastPlanner(warm_start=False), lagrange=False)
    mip = CompactIlpPlanner(rel_gap=gap, max_nodes=200_000, time_limit_s=60.0, search="mip",
                            fast=FastPlanner(warm_start=False))
    lagrange = CompactIlpPlanner(rel_gap=gap, max_nodes=20_000, max_rounds=8, time_limit_s=60.0,
                                 fast=FastPlanner(warm_start=False))
    a, b, c = chains.solve(inp), mip.solve(inp), lagrange.solve(inp)
    fast = FastPlanner(warm_start=False).solve(inp)
    assert a.status is b.status is c.status is PlanStatus.OPTIMAL and chains.stats["precertified"] == 0
    assert chains.stats["chain_mips"] >= 1 and chains.stats["lp_solves"] == 1
    assert lagrange.stats["lagrange_proven"] + lagrange.stats["chain_mips"] >= 1
    assert a.predicted_step_s == pytest.approx(b.predicted_step_s, rel=2 * gap)
    assert c.predicted_step_s == pytest.approx(b.predicted_step_s, rel=2 * gap)
    for plan in (a, b, c):
        T, late, dev = evaluate(inp, plan.distances, plan.window)
        assert (T, late, dev) == (plan.predicted_step_s, plan.violations, plan.device_bytes)
        assert dev <= inp.device_capacity_bytes and not plan_better(inp, fast, plan)


def test_search_and_rounds_are_validated():
    with pytest.raises(ValueError, match="search"):
        CompactIlpPlanner(search="dp")
    with pytest.raises(ValueError, match="max_rounds"):
        CompactIlpPlanner(max_rounds=0)
