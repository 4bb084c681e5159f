"""The placement ILP against brute force, and the properties the planner promises its caller."""

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from orbitflow_ray.planner import fastpath
from orbitflow_ray.planner.fastpath import FastPlanner, link_eval
from orbitflow_ray.planner.ilp import IlpPlanner
from orbitflow_ray.planner.ilp_highs import HighsPlanner
from orbitflow_ray.planner.problem import (T_RTOL, PlanInputs, PlanRequest, PlanStatus, _stall_s,
                                           device_bytes, evaluate, fit_whole_plan, link_bytes,
                                           placement_for_distance, plan_better, window_counts, window_data)
from orbitflow_ray.planner.uniform import UniformPlanner

KVB, BW, A, B = 4096, 25e9, 2e-4, 2.3e-9  # Llama-3.1-8B-like per-layer KV; PCIe-class link
EXACT = 1e-9

# one planner of each kind for the whole module: compiled problems are cached across examples
# Exactness is what these compare against brute force, so the MIPs get time to prove it: the
# production 2 s limit can cut a solve short on a loaded CI machine (seen once in the tie-break solve).
PROVE_S = 60.0
CVXPY = IlpPlanner(rel_gap=EXACT, time_limit_s=PROVE_S)
HIGHS = HighsPlanner(True, EXACT, time_limit_s=PROVE_S)
REDUCED = HighsPlanner(False, EXACT, time_limit_s=PROVE_S)
FAST = FastPlanner(warm_start=False)


def brute_force(inp: PlanInputs):
    """Lexicographic optimum (violations, T, link bytes, -W) over every distance combination and
    feasible window, step times within T_RTOL a tie: (violations, least T, W, link bytes), None if
    nothing fits. A window is feasible when the batch fits at its largest offload short of all-host
    (`PlanInputs.largest_offload`); within it any placement that fits counts, all-host included."""
    scored = []
    for w in inp.windows:
        if inp.min_device_bytes(w) > inp.device_capacity_bytes:
            continue
        for combo in itertools.product(inp.distances, repeat=len(inp.requests)):
            T, late, dev = evaluate(inp, list(combo), w)
            if dev <= inp.device_capacity_bytes:
                scored.append((len(late), T, link_bytes(inp, list(combo)), w))
    if not scored:
        return None
    n_late, T = min(scored)[:2]
    ties = [s for s in scored if s[0] == n_late and s[1] <= T * (1 + T_RTOL)]
    moved = min(s[2] for s in ties)
    return n_late, T, max(s[3] for s in ties if s[2] == moved), moved


# compute seconds per copied byte where copies cost compute (`PlanInputs.copy_compute_s_per_byte`):
# copy_ratio 0.5, 2.5 and 10 at BW (the CPU box's fit is about 2)
COPY_COMPUTE = (2e-11, 1e-10, 4e-10)


@st.composite
def instances(draw, copy: bool = False):
    L = draw(st.integers(4, 8))
    n = draw(st.integers(1, 4))
    reqs = [PlanRequest(f"r{i}", draw(st.integers(1, 64)) * 256, draw(st.integers(1, 200)),
                        draw(st.floats(0.5, 3.0)) * L * 3e-4, draw(st.sampled_from([0, 0, 5, 50])))
            for i in range(n)]
    full = sum(r.context_tokens + r.growth(32) for r in reqs) * L * KVB
    distances = draw(st.lists(st.integers(1, L), min_size=3, max_size=4, unique=True))
    distances += draw(st.sampled_from([[], [0]]))  # half the instances may stream all-host
    cap = int(full * draw(st.floats(0.6, 1.1)))  # mostly feasible; some infeasible when no small d is drawn
    ccpb = draw(st.sampled_from(COPY_COMPUTE)) if copy else 0.0
    return PlanInputs(reqs, L, KVB, cap, BW, A, B, distances=tuple(distances), windows=(32, 64, 128),
                      copy_compute_s_per_byte=ccpb)


@given(instances(), st.floats(1.0, 2.0))
@settings(max_examples=60, deadline=None)
def test_fit_whole_plan_is_the_lexicographic_optimum(inp, room):
    """When every layer of every request fits on device at the longest window, `fit_whole_plan`
    is the brute-force optimum (violations, T, link bytes, -W), found with no search, and the fast
    path returns the same plan; one byte short of that, it declines."""
    L = inp.num_layers
    whole = device_bytes(inp, [L] * len(inp.requests), inp.windows[-1])
    inp = dataclasses.replace(inp, distances=tuple(sorted(set(inp.distances) | {L})),
                              device_capacity_bytes=int(whole * room))
    plan = fit_whole_plan(inp, "fast")
    n_late, T, W, moved = brute_force(inp)
    assert (len(plan.violations), plan.window, moved) == (n_late, W, 0)
    assert plan.predicted_step_s <= T * (1 + T_RTOL) and plan.status is PlanStatus.OPTIMAL
    assert set(plan.distances.values()) == {L} and plan.device_bytes <= inp.device_capacity_bytes
    fast = FastPlanner(warm_start=False).solve(inp)
    assert (fast.distances, fast.window, fast.violations) == (plan.distances, plan.window, plan.violations)
    assert fit_whole_plan(dataclasses.replace(inp, device_capacity_bytes=whole - 1), "fast") is None


def test_placement_convention():
    assert placement_for_distance(0, 8) == [True] * 8  # all-host
    assert placement_for_distance(1, 8) == [False, True] * 4  # every other layer: half offloaded
    assert [j for j, h in enumerate(placement_for_distance(3, 8)) if h] == [3, 7]
    assert placement_for_distance(7, 8) == [False] * 7 + [True]
    assert not any(placement_for_distance(8, 8)) and not any(placement_for_distance(31, 8))
    ratios = {sum(placement_for_distance(d, 32)) / 32 for d in (1, 2, 3, 4, 5, 7, 9, 15, 31, 32)}
    assert min(ratios) == 0 and max(ratios) == 0.5 and len(ratios) == 10  # ten distinct offload ratios
    for d in range(1, 8):  # every host layer has d device layers before it to hide its transfer
        hosts = [j for j, h in enumerate(placement_for_distance(d, 24)) if h]
        assert all(h >= d for h in hosts) and all(b - a == d + 1 for a, b in zip(hosts, hosts[1:]))


def test_step_model_by_hand():
    """One request, d = 1, L = 4: host layers 1 and 3, each transfer hidden under one layer."""
    inp = PlanInputs([PlanRequest("a", 10_000, 10, 1.0)], 4, KVB, 10**12, BW, A, B, distances=(1, 4))
    c, tau = inp.compute_per_layer_s, 10_000 * KVB / BW
    T, late, dev = evaluate(inp, [1], 32)
    assert T == pytest.approx(4 * c + 2 * max(0.0, tau - c))
    assert dev == 2 * (10_000 + 10) * KVB and not late  # growth capped by max_new_tokens_left
    assert evaluate(inp, [4], 32)[0] == pytest.approx(4 * c)


def test_all_host_step_model_by_hand():
    """d = 0, L = 4: each layer's transfer is released when the layer before it ends and lands
    before the layer starts, so no compute hides it. A d = 1 request beside it still hides its
    transfers under compute: the all-host ones use only the stalls."""
    reqs = [PlanRequest("a", 2_000, 10, 1.0), PlanRequest("b", 10_000, 10, 1.0)]
    inp = PlanInputs(reqs, 4, KVB, 10**12, BW, A, B, distances=(0, 1, 4))
    c, ta, tb = inp.compute_per_layer_s, 2_000 * KVB / BW, 10_000 * KVB / BW
    assert tb > c  # b's d = 1 transfers stall too
    cases = {(0, 4): 4 * c + 4 * ta, (0, 0): 4 * c + 4 * (ta + tb),
             (0, 1): 4 * c + 4 * ta + 2 * (tb - c), (1, 1): 4 * c + 2 * (ta + tb - c)}
    link = link_eval(4, inp.distances)
    for combo, want in cases.items():
        T, late, dev = evaluate(inp, list(combo), 32)
        assert T == pytest.approx(want) and not late, combo
        loads = np.bincount([inp.distances.index(d) for d in combo], weights=[ta, tb], minlength=3)
        assert c * (4 + link.stall(loads[None] / c)[0]) == pytest.approx(want), combo
    assert evaluate(inp, [0, 4], 32)[2] == 4 * (10_000 + 10) * KVB  # all-host holds no device KV
    assert link_bytes(inp, [0, 1]) == (4 * 2_000 + 2 * 10_000) * KVB


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 40), st.lists(st.integers(0, 40), min_size=2, max_size=6, unique=True),
       st.lists(st.floats(0, 50), min_size=6, max_size=6))
def test_critical_intervals_give_the_full_longest_path(L, ds, loads):
    ds = tuple(sorted({min(d, L) for d in ds}))
    Y = np.array(loads[:len(ds)])
    full = _stall_s(window_counts(L, ds), Y, 1.0, 1.0)
    assert link_eval(L, ds).stall(Y[None])[0] == pytest.approx(full, abs=1e-9)


# Two draws CI found (a stale warm start made the reference ILP's byte tie-break return the plan it
# started from; it now solves cold): a window that only the least-bytes plan of the shorter one beats.
_TIE_BREAK_1 = PlanInputs((PlanRequest("r0", 1536, 162, 0.0042), PlanRequest("r1", 256, 1, 0.0021157860469777725),
                           PlanRequest("r2", 7680, 45, 0.0021)), 7, KVB, 273_442_129, BW, A, B,
                          distances=(1, 2, 5, 7), windows=(32, 64, 128))
_TIE_BREAK_2 = PlanInputs((PlanRequest("r0", 9728, 6, 0.004783245010102509, 50),
                           PlanRequest("r1", 13568, 53, 0.0009000000000000002, 50),
                           PlanRequest("r2", 256, 164, 0.002334140280409, 5),
                           PlanRequest("r3", 1536, 200, 0.0009000000000000002, 5)), 6, KVB, 619_063_249, BW, A, B,
                          distances=(0, 2, 4, 6), windows=(32, 64, 128))


@settings(max_examples=60, deadline=None)
@given(instances())
@example(_TIE_BREAK_1)
@example(_TIE_BREAK_2)
def test_ilp_matches_brute_force(inp):
    _mips_match_brute_force(inp)


def _mips_match_brute_force(inp):
    best = brute_force(inp)
    for planner in (CVXPY, HIGHS, REDUCED):
        plan = planner.solve(inp)
        if best is None:
            assert plan.status is PlanStatus.INFEASIBLE
            continue
        assert (len(plan.violations), plan.window) == (best[0], best[2]), planner.name
        assert plan.predicted_step_s == pytest.approx(best[1], rel=1e-6), planner.name
        assert link_bytes(inp, plan.distances) == best[3], planner.name
        T, late, dev = evaluate(inp, plan.distances, plan.window)
        assert dev == plan.device_bytes <= inp.device_capacity_bytes
        assert (T, late) == (plan.predicted_step_s, plan.violations)
        assert plan.host_layers == {r: [j for j, h in enumerate(placement_for_distance(d, inp.num_layers)) if h]
                                    for r, d in plan.distances.items()}


@settings(max_examples=60, deadline=None)
@given(instances())
def test_fast_path_within_its_gap(inp):
    _fast_path_within_its_gap(inp)


def _fast_path_within_its_gap(inp):
    enumerated = FAST.stats["enumerated"]
    best, plan = brute_force(inp), FAST.solve(inp)
    if best is None:
        assert plan.status is PlanStatus.INFEASIBLE
        return
    assert plan.device_bytes <= inp.device_capacity_bytes
    if plan.status is PlanStatus.OPTIMAL:  # T and the violation set certified
        assert plan.predicted_step_s <= best[1] * (1 + FAST.rel_gap) and len(plan.violations) == best[0]
    if FAST.stats["enumerated"] > enumerated:  # batches this small are enumerated: exact, ties included
        assert (len(plan.violations), plan.window, link_bytes(inp, plan.distances)) == \
            (best[0], best[2], best[3])
        assert plan.predicted_step_s == pytest.approx(best[1], rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(instances())
def test_fast_path_search_without_enumeration(inp):
    """Greedy, certificate, branch and bound and MIP fallback, on batches small enough to check."""
    _fast_path_search_without_enumeration(inp)


def _fast_path_search_without_enumeration(inp):
    best, limit = brute_force(inp), fastpath.ENUM_LIMIT
    fastpath.ENUM_LIMIT = 0
    try:
        exact = FastPlanner(rel_gap=EXACT, fallback_time_limit_s=5.0, warm_start=False)
        plan = FAST.solve(inp)
        exact_plan = exact.solve(inp)
    finally:
        fastpath.ENUM_LIMIT = limit
    if best is None:
        assert plan.status is exact_plan.status is PlanStatus.INFEASIBLE
        return
    assert plan.device_bytes <= inp.device_capacity_bytes
    if plan.status is PlanStatus.OPTIMAL:  # certified (the default has no MIP fallback)
        assert plan.predicted_step_s <= best[1] * (1 + FAST.rel_gap)
    assert len(exact_plan.violations) == best[0]
    assert exact_plan.predicted_step_s == pytest.approx(best[1], rel=1e-6)
    # the byte tie-break is greedy without enumeration (and the window follows the bytes): it can
    # miss the least bytes, never go below them
    assert link_bytes(inp, exact_plan.distances) >= best[3]


@settings(max_examples=30, deadline=None)
@given(instances(copy=True))
def test_every_solver_prices_copy_compute(inp):
    """Where copies cost compute (the CPU backend), T is L * c + stall + the copies' compute, and
    every solver finds the brute-force optimum of that: the three MIPs exactly, the fast path
    within its gap (exactly when it enumerates), its search without enumeration too."""
    _mips_match_brute_force(inp)
    _fast_path_within_its_gap(inp)
    _fast_path_search_without_enumeration(inp)


def test_step_time_charges_the_copies_compute():
    """`step_time` adds copy_compute_s_per_byte x the host layers' KV copied in, and the fast
    path's link (a virtual last interval) prices the same: stall + copy_ratio x host layers x load."""
    reqs = [PlanRequest("a", 2_000, 10, 1.0), PlanRequest("b", 10_000, 10, 1.0)]
    base = PlanInputs(reqs, 4, KVB, 10**12, BW, A, B, distances=(0, 1, 4))
    inp = dataclasses.replace(base, copy_compute_s_per_byte=1e-10)
    c, ratio = inp.compute_per_layer_s, 1e-10 * BW
    assert inp.copy_ratio == pytest.approx(2.5)
    link0, link = link_eval(4, inp.distances), link_eval(4, inp.distances, inp.copy_ratio)
    for combo, host_tokens in {(4, 4): 0, (1, 4): 2 * 2_000, (0, 1): 4 * 2_000 + 2 * 10_000,
                               (0, 0): 4 * 12_000}.items():
        assert evaluate(inp, list(combo), 32)[0] == pytest.approx(
            evaluate(base, list(combo), 32)[0] + 1e-10 * host_tokens * KVB, rel=1e-12), combo
        loads = np.bincount([inp.distances.index(d) for d in combo],
                            weights=[2_000 * KVB / BW / c, 10_000 * KVB / BW / c], minlength=3)
        assert link.stall(loads[None])[0] == pytest.approx(
            link0.stall(loads[None])[0] + ratio * host_tokens * KVB / BW / c, rel=1e-12), combo
        m, s, _ = link.chain(loads)  # the critical chain bounds it exactly
        assert m @ loads - s == pytest.approx(link.stall(loads[None])[0], rel=1e-12), combo


def test_copy_compute_changes_the_placement():
    """A batch whose least-stall placement copies more KV than needed: priced with the copies'
    compute, every solver moves r1 to d = 1 (two of its five layers on host) instead of a layer of
    each request (found by a random search; brute force confirms both optima)."""
    from orbitflow_ray.planner.ilp_compact import CompactIlpPlanner
    reqs = [PlanRequest("r0", 7680, 187, 0.0008480101834032218, 5),
            PlanRequest("r1", 5120, 123, 0.0036551391673880222, 0)]
    base = PlanInputs(reqs, 5, KVB, 230469658, BW, A, B, distances=(1, 2, 4, 5), windows=(32, 64, 128))
    inp = dataclasses.replace(base, copy_compute_s_per_byte=1e-10)
    T_stall_only, T_copy = brute_force(base)[1], brute_force(inp)[1]
    compact = CompactIlpPlanner(rel_gap=EXACT, time_limit_s=PROVE_S, fast=FastPlanner(warm_start=False))
    for planner in (CVXPY, HIGHS, REDUCED, FastPlanner(warm_start=False), compact):
        assert planner.solve(base).predicted_step_s == pytest.approx(T_stall_only, rel=1e-9), planner.name
        plan = planner.solve(inp)
        assert plan.distances == {"r0": 5, "r1": 1}, planner.name
        assert plan.predicted_step_s == pytest.approx(T_copy, rel=1e-9), planner.name
    stall_only_plan = FastPlanner(warm_start=False).solve(base).distances
    assert stall_only_plan != {"r0": 5, "r1": 1}
    assert evaluate(inp, stall_only_plan, 128)[0] > T_copy * 1.1  # 13 % slower once copies are priced


@pytest.mark.parametrize("seed", range(3))
def test_capacity_holds_at_scale(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(4096, 131072, 24)
    reqs = [PlanRequest(f"r{i}", int(t), int(m), 0.05, 0) for i, (t, m) in enumerate(zip(n, rng.integers(1, 500, 24)))]
    cap = int((n + 128).sum() * 32 * KVB * rng.uniform(0.55, 0.95))
    inp = PlanInputs(reqs, 32, KVB, cap, BW, 2.6e-4, B)
    for planner in (FAST, HighsPlanner(False, rel_gap=1e-2, time_limit_s=0.5)):
        plan = planner.solve(inp)
        assert plan.status is not PlanStatus.INFEASIBLE
        assert evaluate(inp, plan.distances, plan.window)[2] == plan.device_bytes <= cap


def test_lexicographic_weights_on_every_plan():
    """The ILP's objective weight * violations + stall orders all plans as (violations, T), and in
    this model violations never fall as T rises (one batch step time, thresholds per request)."""
    reqs = [PlanRequest(f"r{i}", t, 100, s, d) for i, (t, s, d) in
            enumerate([(4096, 3.5e-3, 0), (20_000, 6e-3, 10), (60_000, 2e-2, 0), (9000, 4e-3, 40)])]
    inp = PlanInputs(reqs, 8, KVB, 10**12, BW, A, B, distances=(1, 2, 3, 8))
    data, c = window_data(inp, 32), inp.compute_per_layer_s
    plans = [evaluate(inp, list(p), 32) for p in itertools.product(inp.distances, repeat=4)]
    keys = sorted((len(late), T) for T, late, _ in plans)
    assert len({k[0] for k in keys}) > 1  # the instance does produce different violation counts
    assert all(a[1] <= b[1] for a, b in zip(keys, keys[1:]))  # monotone: fewer violations, smaller T
    obj = [data["weight"] * nv + (T / c - inp.num_layers) for nv, T in keys]
    assert all(x <= y for x, y in zip(obj, obj[1:]))
    worst_T_fewer = max(k[1] for k in keys if k[0] == keys[0][0])
    assert data["weight"] * keys[0][0] + worst_T_fewer / c < data["weight"] * (keys[0][0] + 1)


def _one_request(slo_s, deposit, capacity, context=8192):
    return PlanInputs([PlanRequest("a", context, 1000, slo_s, deposit)], 8, KVB, capacity, BW, A, B,
                      distances=(1, 3, 8))


@pytest.mark.parametrize("planner", [CVXPY, REDUCED, FAST], ids=lambda p: p.name)
def test_lexicographic_order_end_to_end(planner):
    c8 = 8 * (A + B * 8192)  # T with no offload
    # ample capacity: every window reaches the same (violations, T): the longest wins
    assert planner.solve(_one_request(1.0, 0, 10**12)).window == 128
    # capacity for 8 layers only at W = 32: a longer window costs T, so the shortest wins
    tight = _one_request(1.0, 0, 8 * (8192 + 32) * KVB)
    plan = planner.solve(tight)
    assert (plan.window, plan.distances["a"], plan.predicted_step_s) == (32, 8, pytest.approx(c8))
    # T misses the bare SLO; 10 banked tokens cover the lag over 32 steps, not over 64 or 128:
    # fewer violations beat the longer window at equal T
    slo = c8 / 1.2
    plan = planner.solve(_one_request(slo, 10, 10**12))
    assert (plan.window, plan.violations) == (32, set())
    assert planner.solve(_one_request(slo, 0, 10**12)).violations == {"a"}


FAST_LINK = 1e13  # hides every transfer: offloading costs no predicted stall


def _batch(n, layers, capacity, link=FAST_LINK):
    reqs = [PlanRequest(f"r{i}", 256 * (1 + i % 7), 100 + i, 1.0) for i in range(n)]
    return PlanInputs(reqs, layers, KVB, capacity, link, A, B)


def test_ample_capacity_offloads_nothing():
    """Every placement ties on T when the link hides all transfers: the tie goes to moving
    nothing, in every solver, and on the fast path's greedy even from an all-offloaded warm start."""
    small, large = _batch(3, 8, 10**12), _batch(32, 32, 10**12)
    enumerated = FAST.stats["enumerated"]
    warm = FastPlanner()
    warm.last = {r.request_id: 1 for r in large.requests}  # the previous plan offloaded half
    cases = [(p, small) for p in (CVXPY, HIGHS, REDUCED, FAST, UniformPlanner())] + \
        [(FAST, large), (warm, large), (UniformPlanner(), large)]
    for planner, inp in cases:
        plan = planner.solve(inp)
        assert set(plan.distances.values()) == {inp.num_layers}, planner.name
        assert link_bytes(inp, plan.distances) == 0 and not any(plan.host_layers.values())
        assert plan.window == max(inp.windows) and plan.status is PlanStatus.OPTIMAL
    assert FAST.stats["enumerated"] == enumerated + 1 and warm.stats["enumerated"] == 0  # large: greedy


@pytest.mark.parametrize("planner", [CVXPY, REDUCED, FAST, UniformPlanner()], ids=lambda p: p.name)
def test_free_offload_is_not_traded_for_a_longer_window(planner):
    """Room for all 8 layers at W = 32 only: with a link that hides transfers a longer window
    (offloading) ties on T, and the plan keeps the bytes on device at the shorter window."""
    inp = PlanInputs([PlanRequest("a", 8192, 1000, 1.0)], 8, KVB, 8 * (8192 + 32) * KVB, FAST_LINK, A, B,
                     distances=(1, 3, 8))
    assert evaluate(inp, [1], 128)[0] == evaluate(inp, [8], 32)[0]  # a tie on T
    plan = planner.solve(inp)
    assert (plan.window, plan.distances) == (32, {"a": 8})


@pytest.mark.parametrize("distances", [(1, 8), (0, 1, 8)])
def test_infeasible_reports_largest_first(distances):
    """Overload is INFEASIBLE (Pause-Resume's cue) with all-host allowed too: streaming requests
    that fit at d = 1 on their own all-host would fit the device, but is not the answer to it."""
    reqs = [PlanRequest("small", 1000, 50, 1.0), PlanRequest("big", 9000, 50, 1.0), PlanRequest("mid", 5000, 50, 1.0)]
    need = 4 * (1000 + 32 + 9000 + 32 + 5000 + 32) * KVB  # every request at d = 1 keeps 4 of 8 layers
    for planner in (CVXPY, REDUCED, FAST, UniformPlanner()):
        plan = planner.solve(PlanInputs(reqs, 8, KVB, need - 1, BW, A, B, distances=distances))
        assert plan.status is PlanStatus.INFEASIBLE and plan.pause_candidates == ["big", "mid", "small"]
        assert not plan.distances and plan.device_bytes == need
        ok = planner.solve(PlanInputs(reqs, 8, KVB, need, BW, A, B, distances=distances))
        assert ok.status is PlanStatus.OPTIMAL and ok.window == 32 and set(ok.distances.values()) == {1}


def test_all_host_only_for_what_fits_nowhere_else():
    """`big` does not fit the device even alone at d = 1: it streams all-host, and `small` beside
    it stays on device (all-host is no excuse to offload what fits). Without d = 0: INFEASIBLE."""
    reqs = [PlanRequest("big", 10_000, 10, 1.0), PlanRequest("small", 256, 10, 1.0)]
    cap = 3 * (10_000 + 10) * KVB  # d = 1 keeps 4 of 8 layers
    inp = PlanInputs(reqs, 8, KVB, cap, BW, A, B)
    assert inp.largest_offload() == [0, 1] and inp.min_device_bytes(128) == 4 * (256 + 10) * KVB
    for planner in (CVXPY, HIGHS, REDUCED, FAST):
        plan = planner.solve(inp)
        assert plan.distances == {"big": 0, "small": 8}, planner.name
        assert plan.status is PlanStatus.OPTIMAL
        assert plan.host_layers["big"] == list(range(8)) and plan.window == 128
    assert set(UniformPlanner().solve(inp).distances.values()) == {0}  # one distance for the batch
    paper = PlanInputs(reqs, 8, KVB, cap, BW, A, B, distances=(1, 2, 3, 4, 5, 7, 8))
    assert FAST.solve(paper).status is PlanStatus.INFEASIBLE


def test_all_host_when_it_is_fastest():
    """Room for `big` whole on device only if `small` holds no device KV: streaming the small one
    all-host costs 8 tiny transfers, offloading half of the big one four long ones."""
    reqs = [PlanRequest("big", 40_000, 10, 1.0), PlanRequest("small", 256, 10, 1.0)]
    cap = 8 * (40_000 + 10) * KVB + 4 * (256 + 10) * KVB - 1
    inp = PlanInputs(reqs, 8, KVB, cap, BW, A, B, distances=(0, 1, 8))
    best = brute_force(inp)
    assert inp.largest_offload() == [1, 1]  # both fit at d = 1: all-host is a choice here
    for planner in (CVXPY, HIGHS, REDUCED, FAST):
        plan = planner.solve(inp)
        assert plan.distances == {"big": 8, "small": 0}, planner.name
        assert plan.predicted_step_s == pytest.approx(best[1], rel=1e-9)


def test_dpp_resolve_matches_fresh_compile():
    def batch(seed):
        rng = np.random.default_rng(seed)
        reqs = [PlanRequest(f"r{seed}-{i}", int(rng.integers(4096, 65536)), 200, float(rng.uniform(2e-3, 6e-3)),
                            int(rng.integers(0, 20))) for i in range(6)]
        full = sum(r.context_tokens + 32 for r in reqs) * 16 * KVB
        return PlanInputs(reqs, 16, KVB, int(full * 0.85), BW, A, B, distances=(1, 2, 3, 7, 16))

    warm = IlpPlanner(rel_gap=EXACT)
    warm.solve(batch(0))
    problem = warm.compiled(batch(0)).problem
    assert problem.is_dpp()
    for seed in (1, 2):
        again = warm.solve(batch(seed))
        fresh = IlpPlanner(rel_gap=EXACT).solve(batch(seed))
        assert (len(again.violations), again.window) == (len(fresh.violations), fresh.window)
        assert again.predicted_step_s == pytest.approx(fresh.predicted_step_s, rel=1e-6)
    assert warm.compiles == 1 and warm.compiled(batch(3)).problem is problem


def test_inputs_validation():
    ok = dict(num_layers=8, kv_bytes_per_token_per_layer=KVB, device_capacity_bytes=1, link_bytes_per_s=BW,
              compute_a_s=A, compute_b_s_per_token=B)
    assert PlanInputs([], **ok).distances == (0, 1, 2, 3, 4, 5, 7, 8)  # defaults clipped to L
    assert PlanInputs([], distances=(9, 3, 3), **ok).distances == (3, 8)
    with pytest.raises(ValueError):
        PlanInputs([PlanRequest("a", 1, 1, 1.0)] * 2, **ok)
    with pytest.raises(ValueError):
        PlanInputs([], distances=(-1,), **ok)
    with pytest.raises(ValueError):
        PlanRequest("a", 0, 1, 1.0)
    assert _one_request(1.0, 64, 10**12).requests[0].effective_slo_s(32) == pytest.approx(3.0)


@st.composite
def mid_instances(draw, copy: bool = False):
    """Batches too large for the fast path to enumerate (K^R x intervals > ENUM_LIMIT), small
    enough for the reference MIP to prove its optimum (`copy`: copies cost compute)."""
    L, n = 8, draw(st.integers(6, 7))  # 8 distances: 8^6 x 22 intervals > ENUM_LIMIT
    reqs = [PlanRequest(f"r{i}", draw(st.integers(4, 128)) * 256, draw(st.integers(1, 200)),
                        draw(st.floats(1.0, 3.0)) * L * 3e-4, draw(st.sampled_from([0, 5, 50])))
            for i in range(n)]
    full = sum(r.context_tokens + r.growth(32) for r in reqs) * L * KVB
    ccpb = draw(st.sampled_from(COPY_COMPUTE)) if copy else 0.0
    return PlanInputs(reqs, L, KVB, int(full * draw(st.floats(0.6, 0.95))), BW, A, B, windows=(32, 64),
                      copy_compute_s_per_byte=ccpb)


@settings(max_examples=5, deadline=None)
@given(mid_instances())
def test_compact_ilp_reaches_the_reference_optimum(inp):
    """The compact model (no violation binaries, distance classes, critical intervals only),
    given a budget to prove, lands on the reference model's optimum at its window, and is never
    worse than the fast plan it starts from."""
    _compact_reaches_the_reference(inp)


@settings(max_examples=3, deadline=None)
@given(mid_instances(copy=True))
def test_compact_ilp_reaches_the_reference_optimum_with_copy_compute(inp):
    """The same where copies cost compute (the LP row, chains and Lagrangian bound all price them)."""
    _compact_reaches_the_reference(inp)


def _compact_reaches_the_reference(inp):
    from orbitflow_ray.planner.ilp_compact import CompactIlpPlanner
    compact = CompactIlpPlanner(rel_gap=EXACT, max_nodes=100_000, prove=True, time_limit_s=PROVE_S,
                                fast=FastPlanner(warm_start=False))
    plan, fast = compact.solve(inp), FastPlanner(warm_start=False).solve(inp)
    assert not plan_better(inp, fast, plan)
    if fast.status is PlanStatus.INFEASIBLE:
        assert plan.status is PlanStatus.INFEASIBLE
        return
    assert plan.status is PlanStatus.OPTIMAL and plan.window == fast.window
    ks, proven = CVXPY.solve_window(inp, plan.window)
    ref = [inp.distances[k] for k in ks]
    T_ref, late_ref, _ = evaluate(inp, ref, plan.window)
    assert proven and plan.predicted_step_s == pytest.approx(T_ref, rel=1e-6)
    assert len(plan.violations) == len(late_ref)
    assert link_bytes(inp, plan.distances) <= link_bytes(inp, ref) * (1 + 1e-9)
    T, late, dev = evaluate(inp, plan.distances, plan.window)
    assert dev == plan.device_bytes <= inp.device_capacity_bytes and (T, late) == (plan.predicted_step_s, plan.violations)


def test_compact_ilp_skips_the_mip_when_the_fast_bound_proves_the_plan():
    """Ample capacity: nothing offloaded, T = L * c, which the fast path's bound proves; no MIP
    is built or run, and the plan is OPTIMAL."""
    from orbitflow_ray.planner.ilp_compact import CompactIlpPlanner
    reqs = [PlanRequest(f"r{i}", 4096 * (i + 1), 64, 1.0, 0) for i in range(12)]
    full = sum(r.context_tokens + r.growth(128) for r in reqs) * 8 * KVB
    inp = PlanInputs(reqs, 8, KVB, 2 * full, BW, A, B, windows=(32, 64))
    compact = CompactIlpPlanner(fast=FastPlanner(warm_start=False))
    plan = compact.solve(inp)
    assert plan.status is PlanStatus.OPTIMAL and link_bytes(inp, plan.distances) == 0
    assert compact.stats["precertified"] == 1 and compact.compiles == 0
