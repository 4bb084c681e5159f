"""The central planner's Lagrangian bound (`planner/ilp_lagrange.py`): its knapsack is exact, its
bound never passes the least stall, and it proves a plan the LP relaxation's bound does not."""

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from orbitflow_ray.planner.fastpath import FastPlanner, knapsack_bound, lower_bound, offload_greedy
from orbitflow_ray.planner.ilp_compact import CENTRAL_REL_GAP, CompactIlpPlanner
from orbitflow_ray.planner.ilp_lagrange import LagrangianBound, mckp, undominated
from orbitflow_ray.planner.problem import PlanInputs, fits, step_time
from test_ilp import instances
from test_ilp_targets import _three_requests

KVB, BW = 4096, 25e9


def _placements(K: int, R: int):
    return (np.array(ks) for ks in itertools.product(range(K), repeat=R))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 5), st.integers(0, 2**31), st.sampled_from([1, 3, 50, 10**6]))
def test_knapsack_is_exact_and_its_bound_valid_on_any_budget(R, K, seed, max_nodes):
    """Against every placement: the bound is at most the least cost of a placement that fits, the
    placement returned fits and costs what is said, and an exhausted search is exact."""
    rng = np.random.default_rng(seed)
    load, e = rng.uniform(0.1, 5.0, R), rng.integers(1, 200, R)
    dev = np.sort(rng.choice(np.arange(0, 9), K, replace=False))[::-1].astype(np.int64)
    w = rng.uniform(0.0, 4.0, K)
    cap = int(rng.integers(int(e @ np.full(R, dev.min())), int(e @ np.full(R, dev.max())) + 1))
    costs = [(float(load @ w[ks]), ks) for ks in _placements(K, R) if int(e @ dev[ks]) <= cap]
    least = min(c for c, _ in costs)
    lower, ks, value, nodes, exact = mckp(load, e, dev, cap, w, max_nodes)
    assert lower <= least * (1 + 1e-9) + 1e-9
    assert int(e @ dev[ks]) <= cap and value == pytest.approx(float(load @ w[ks]), rel=1e-12)
    assert value >= least * (1 - 1e-12) - 1e-12 and nodes <= max_nodes + 1
    if exact:
        assert lower == pytest.approx(least, rel=1e-9, abs=1e-9) and value == pytest.approx(least, rel=1e-12)
    assert mckp(load, e, dev, cap, w, 10**6)[4]  # these sizes always finish


def test_undominated_classes_and_an_overfull_row():
    # class 2 costs more than class 1 for the same device layers; class 3 holds fewer than all
    assert undominated(np.array([4, 2, 2, 0]), np.array([0.0, 1.0, 3.0, 2.0])).tolist() == [0, 1, 3]
    assert undominated(np.array([4, 2, 0]), np.array([0.0, 2.0, 2.0])).tolist() == [0, 2]  # 1: more device, same cost
    with pytest.raises(ValueError, match="no placement fits"):
        mckp(np.array([1.0]), np.array([5]), np.array([2, 1]), 4, np.array([0.0, 1.0]))


def test_proves_the_optimum_where_the_lp_bound_does_not():
    """`test_ilp_targets`'s three requests (L = 2, all on host or all on device; the stall is
    exactly 2 x the host class's load: the row m = (2, 0), s = 0), with room for 2 x 4,100
    token-layers instead of 2 x 4,002: B and C (2,001 end tokens each) fill 4,002 and A (3,032: it grows by the 32-step window)
    cannot join, A alone leaves B and C out. The LP puts B and C on device and 98/3,032 of A: its
    bound is 2 x load_A x (1 - 98/3,032). Integral, the least stall is 2 x load_A (A on host; A on
    device instead costs 2 x (load_B + load_C) = 4/3 of it), which the Lagrangian bound reaches:
    it proves that plan within 1e-9, where the LP's bound is 3.2 % short."""
    inp = _three_requests()
    inp = PlanInputs(inp.requests, 2, KVB, 2 * 4100 * KVB, BW, 1e-4, 0.0, distances=(0, 2), windows=(32,))
    link, load, e, dev, cap = FastPlanner(warm_start=False)._arrays(inp, 32)
    assert e.tolist() == [3032, 2001, 2001] and dev.tolist() == [0, 2] and cap == 8200
    row = (np.array([2.0, 0.0]), 0.0)
    c, L = inp.compute_per_layer_s, inp.num_layers
    stalls = {ks: step_time(inp, [inp.distances[k] for k in ks]) / c - L
              for ks in itertools.product(range(2), repeat=3) if fits(inp, 32, ks)}
    assert min(stalls, key=stalls.get) == (0, 1, 1)
    optimum = stalls[(0, 1, 1)]
    assert optimum == pytest.approx(2 * load[0])
    for Y in (np.array([1.0, 2.0]), np.array([3.0, 0.5])):  # the row is the stall itself here
        assert float(link.stall(Y[None])[0]) == pytest.approx(row[0] @ Y)
    lp = knapsack_bound(load, e.astype(float), dev.astype(float), float(cap), row[0])[0]
    assert lp == pytest.approx(2 * load[0] * (1 - 98 / 3032))
    given = np.array([1, 0, 0])  # A on device: the worse plan, the only placement the search is given
    bound, met = LagrangianBound().search(link, load, e, dev, cap, [row], [given], lp, optimum)
    assert optimum * (1 - 2e-9) - 2e-9 <= bound <= optimum  # proven but for the 1e-9 margins; the LP is 3.2 % short
    assert optimum > lp * 1.03
    assert any(ks.tolist() == [0, 1, 1] for ks in met)  # the inner knapsack met the optimum


@settings(max_examples=25, deadline=None)
@given(st.one_of(instances(), instances(copy=True)))
def test_bound_never_passes_the_least_stall(inp):
    """On small random instances, at each window where the batch fits: the Lagrangian bound from
    the fast path's chains is at most the least stall over every placement that fits (the copies'
    compute included where they cost it)."""
    planner = FastPlanner(warm_start=False)
    for window in inp.windows:
        if inp.min_device_bytes(window) > inp.device_capacity_bytes:
            continue
        link, load, e, dev, cap = planner._arrays(inp, window)
        K, R = len(dev), len(load)
        least = min(float(link.stall(np.bincount(ks, weights=load, minlength=K)[None])[0])
                    for ks in _placements(K, R) if int(e @ dev[ks]) <= cap)
        _, chains = lower_bound(link, load, e.astype(float), dev.astype(float), float(cap))
        start = offload_greedy(link, load, e, dev, cap, np.full(R, int(np.argmax(dev))))
        bound, met = LagrangianBound(rounds=4).search(link, load, e, dev, int(cap), chains, [start], 0.0,
                                                      np.inf)
        assert bound <= least + 1e-9 * (1 + least)
        assert all(int(e @ dev[ks]) <= cap for ks in met)


@pytest.mark.parametrize("seed,copy_compute", [(0, 0.0), (1, 0.0), (0, 1e-10)])
def test_central_plan_matches_the_exact_ilp_with_the_bound(seed, copy_compute):
    """At 16 requests x 32 layers the central planner (Lagrangian bound on) returns a plan whose
    step time is within its rel_gap of the compact ILP solved to 1e-9, and never below it: at 1e-4
    (where these batches need the Lagrangian bound) and at the default; also where copies cost
    compute (`copy_compute` s per byte)."""
    from test_planner_central import ILP, _batch
    inp = dataclasses.replace(_batch(16, seed, cap_frac=0.7), copy_compute_s_per_byte=copy_compute)
    exact = ILP.solve(inp)
    for gap in (1e-4, CENTRAL_REL_GAP):
        plan = CompactIlpPlanner(rel_gap=gap).solve(inp)
        assert exact.predicted_step_s * (1 - 1e-9) <= plan.predicted_step_s <= exact.predicted_step_s * (1 + gap)


@settings(max_examples=25, deadline=None)
@given(st.one_of(instances(), instances(copy=True)), st.integers(0, 2**31))
def test_no_weighting_passes_the_stall_of_a_mix(inp, seed):
    """The premise of `search`'s reachability test: for any weighting of chains, g (the exact
    knapsack less the weighted spans) is at most the stall of any mix of placements that fit."""
    planner, rng = FastPlanner(warm_start=False), np.random.default_rng(seed)
    for window in inp.windows:
        if inp.min_device_bytes(window) > inp.device_capacity_bytes:
            continue
        link, load, e, dev, cap = planner._arrays(inp, window)
        K, R = len(dev), len(load)
        fitting = [ks for ks in _placements(K, R) if int(e @ dev[ks]) <= cap]
        _, chains = lower_bound(link, load, e.astype(float), dev.astype(float), float(cap))
        lam = rng.dirichlet(np.ones(len(chains)))
        m, s = sum(w * c[0] for w, c in zip(lam, chains)), float(sum(w * c[1] for w, c in zip(lam, chains)))
        g = mckp(load, e, dev, int(cap), m, 10**6)[0] - s
        mu = rng.dirichlet(np.ones(min(3, len(fitting))))
        picks = rng.choice(len(fitting), len(mu), replace=False)
        mixed = sum(w * np.bincount(fitting[i], weights=load, minlength=K) for w, i in zip(mu, picks))
        assert g <= float(link.stall(mixed[None])[0]) + 1e-9 * (1 + abs(g))


def test_descend_sees_each_placement_and_its_target_stops_the_search():
    """`search` hands each inner placement to `descend` as it is met, with the bound so far; a
    target that the bound reaches (the caller's plan improved) ends the search there; the stall
    rule (patience) stops it once no weighting can reach the target; the probe is asked once, at
    that round, and its bound ends the search when it reaches the target."""
    inp = _three_requests()
    inp = PlanInputs(inp.requests, 2, KVB, 2 * 4100 * KVB, BW, 1e-4, 0.0, distances=(0, 2), windows=(32,))
    link, load, e, dev, cap = FastPlanner(warm_start=False)._arrays(inp, 32)
    row, given = (np.array([2.0, 0.0]), 0.0), np.array([1, 0, 0])
    lp = knapsack_bound(load, e.astype(float), dev.astype(float), float(cap), row[0])[0]
    calls = []

    def keep(ks, bound):
        calls.append((ks.copy(), bound))
        return np.inf

    bound, met = LagrangianBound().search(link, load, e, dev, cap, [row], [given], lp, np.inf, keep)
    assert len(calls) == len(met) >= 2 and all(np.array_equal(ks, m) for (ks, _), m in zip(calls, met))
    assert all(int(e @ dev[ks]) <= cap for ks, _ in calls)
    assert [b for _, b in calls] == sorted(b for _, b in calls) and calls[0][1] >= lp  # the bound so far
    bound, met = LagrangianBound().search(link, load, e, dev, cap, [row], [given], lp, np.inf,
                                          lambda ks, b: -np.inf)
    assert len(met) == 1 and bound >= lp  # the first placement "proved": no master round
    stalled = LagrangianBound(patience=0)
    bound, met = stalled.search(link, load, e, dev, cap, [row], [given], lp, 1e9, keep)
    assert len(met) == 1 and stalled.stats["unreachable"] == 1 and stalled.stats["rounds"] == 1
    with pytest.raises(ValueError, match="patience"):
        LagrangianBound(patience=-1)
    probes = []
    quiet = LagrangianBound()  # a probe is asked once, at the first round that cannot reach the target
    plain = LagrangianBound()
    assert (quiet.search(link, load, e, dev, cap, [row], [given], lp, 1e9, keep, lambda: probes.append(1))[0]
            == plain.search(link, load, e, dev, cap, [row], [given], lp, 1e9, keep)[0])
    assert probes == [1] and quiet.stats["probed"] == 1 and quiet.stats["rounds"] == plain.stats["rounds"]
    proving = LagrangianBound()  # a probe's bound that reaches the target ends the search with it
    bound, met = proving.search(link, load, e, dev, cap, [row], [given], lp, 1e9, keep, lambda: 2e9)
    assert bound == 2e9 and len(met) == 1 and proving.stats["rounds"] == 1
