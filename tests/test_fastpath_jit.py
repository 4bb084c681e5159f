"""The fast path's compiled loops (planner/linkjit.py) against numpy references and the exact model.

Same plans as before the loops were compiled: the compiled stall must equal the numpy loop bit for
bit, a round of `improve` and the path of `LinkEval.chain` must be what their numpy versions (kept
here as the reference) give, and a solve must never compile (the decode thread runs it)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from orbitflow_ray.planner import linkjit
from orbitflow_ray.planner.fastpath import (FastPlanner, LinkEval, _hull, _moved, improve, knapsack_bound, link_eval,
                                            size_partners)
from orbitflow_ray.planner.problem import (PlanInputs, PlanRequest, _device_layers, _stall_s, distance_set,
                                           window_counts)


def improve_round_numpy(link: LinkEval, Y, ks, load, e, dev, slack: int, p_r, p_q):
    """One round of `fastpath.improve` as it was in numpy, in `CompiledLink.improve_round`'s terms:
    (candidates, of them moves, index of the first least stall, that stall, request, class or partner)."""
    rr, kk = np.nonzero(np.arange(len(dev))[None, :] != ks[:, None])
    ok = e[rr] * (dev[kk] - dev[ks[rr]]) <= slack
    rr, kk = rr[ok], kk[ok]
    sw = (ks[p_r] != ks[p_q]) & ((e[p_r] - e[p_q]) * (dev[ks[p_q]] - dev[ks[p_r]]) <= slack)
    r2, q2 = p_r[sw], p_q[sw]
    swapped = np.repeat(Y[None], len(r2), 0)
    idx = np.arange(len(r2))
    swapped[idx, ks[r2]] += load[q2] - load[r2]
    swapped[idx, ks[q2]] += load[r2] - load[q2]
    Ys = np.vstack([_moved(Y, ks, load, rr, kk), swapped])
    if not len(Ys):
        return 0, 0, -1, 0.0, -1, -1
    Fs = link.stall_numpy(Ys)
    b = int(np.argmin(Fs))
    who = (rr[b], kk[b]) if b < len(rr) else (r2[b - len(rr)], q2[b - len(rr)])
    return len(Ys), len(rr), b, Fs[b], *who


def chain_numpy(link: LinkEval, Y: np.ndarray):
    """`LinkEval.chain` as it was in numpy: (m_C, s_C, U) of the critical chain of one load vector."""
    need = link.counts @ Y - link.span
    U, arg = np.zeros(link.L + 1), np.full(link.L + 1, -1)
    for j, g in enumerate(link.by_end):
        U[j + 1] = U[j]
        if g.stop > g.start:
            i = g.start + int(np.argmax(U[link.a[g]] + need[g]))
            if U[link.a[i]] + need[i] > U[j]:
                U[j + 1], arg[j + 1] = U[link.a[i]] + need[i], i
    m, s, j = np.zeros(link.counts.shape[1]), 0.0, link.L
    while j > 0:
        if arg[j] < 0:
            j -= 1
        else:
            m, s, j = m + link.counts[arg[j]], s + link.span[arg[j]], link.a[arg[j]]
    return m, s, U


@st.composite
def links(draw):
    L = draw(st.integers(1, 80))
    ds = distance_set(draw(st.lists(st.integers(0, 90), min_size=1, max_size=11, unique=True)), L)
    return L, ds


@settings(max_examples=60, deadline=None)
@given(links(), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_compiled_stall_is_the_numpy_loop_and_the_exact_model(link_def, n, seed):
    L, ds = link_def
    link, rng = link_eval(L, ds), np.random.default_rng(seed)
    Y = rng.exponential(rng.uniform(0.01, 5.0), (n, len(ds))) * (rng.random((n, len(ds))) < 0.7)
    got = link.stall(Y)
    assert np.array_equal(got, link.stall_numpy(Y))  # bit for bit: the plans cannot change
    for row in range(min(n, 4)):
        exact = _stall_s(window_counts(L, ds), Y[row], 1.0, 1.0)
        assert got[row] == pytest.approx(exact, rel=1e-12, abs=1e-9)
    m, s, U = link.chain(Y[0])
    m_ref, s_ref, U_ref = chain_numpy(link, Y[0])
    assert np.array_equal(m, m_ref) and s == s_ref and np.array_equal(U, U_ref)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([8, 32, 80]), st.integers(1, 48), st.floats(0.0, 0.2), st.integers(0, 2**32 - 1))
def test_compiled_improve_round_is_the_numpy_round(L, R, slack_frac, seed):
    ds = distance_set(None, L)
    link, rng = link_eval(L, ds), np.random.default_rng(seed)
    dev = _device_layers(L, ds)
    load = rng.exponential(1.0, R)
    e = rng.integers(256, 131072, R)
    ks = rng.integers(0, len(ds), R)
    Y = np.bincount(ks, weights=load, minlength=len(ds))
    slack = int(slack_frac * int(e @ dev[ks]))  # from no room to move anything up to a fifth spare
    got = link.jit.improve_round(Y, ks, load, e, dev, slack, *size_partners(load, 6))
    want = improve_round_numpy(link, Y, ks, load, e, dev, slack, *size_partners(load, 6))
    if got[0] == 1:  # one candidate: `improve` rescores it with numpy's one-vector sum
        got, want = got[:3] + got[4:], want[:3] + want[4:]
    assert got == want


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([8, 32, 80]), st.integers(2, 48), st.integers(0, 2**32 - 1))
def test_improve_descends_within_capacity(L, R, seed):
    ds = distance_set(None, L)
    link, rng = link_eval(L, ds), np.random.default_rng(seed)
    dev, load, e = _device_layers(L, ds), rng.exponential(1.0, R), rng.integers(256, 131072, R)
    ks = rng.integers(0, len(ds), R)
    cap = int(1.1 * int(e @ dev[ks]))
    out = improve(link, load, e, dev, cap, ks)
    stall = link.stall_numpy(np.stack([np.bincount(k, weights=load, minlength=len(ds)) for k in (ks, out)]))
    assert int(e @ dev[out]) <= cap and stall[1] <= stall[0]


def knapsack_numpy(load, e, dev, cap, m):
    """`fastpath.knapsack_bound` as it was in numpy (the hull from the same cache)."""
    hull = _hull(dev.tobytes(), m.tobytes())
    pos = np.zeros(len(load), dtype=int)
    weight, value = float(e.sum() * dev[hull[0]]), float(load.sum() * m[hull[0]])
    if len(hull) == 1 or weight <= cap:
        return value, hull[pos], -1
    H = len(hull) - 1
    slopes = (m[hull[1:]] - m[hull[:-1]]) / (dev[hull[:-1]] - dev[hull[1:]])
    order = np.argsort((slopes[None, :] * (load / e)[:, None]).ravel(), kind="stable")
    r, j = np.divmod(order, H)
    save = np.cumsum(e[r] * (dev[hull[j]] - dev[hull[j + 1]]))
    cost = np.cumsum(load[r] * (m[hull[j + 1]] - m[hull[j]]))
    n = min(int(np.searchsorted(save, weight - cap)), len(order) - 1)
    prev_save, prev_cost = (save[n - 1], cost[n - 1]) if n else (0.0, 0.0)
    value += prev_cost + (cost[n] - prev_cost) * (weight - cap - prev_save) / (save[n] - prev_save)
    np.add.at(pos, r[:n + 1], 1)
    return value, hull[pos], int(r[n])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([8, 32, 80]), st.integers(1, 64), st.integers(1, 4), st.floats(0.2, 1.2),
       st.integers(0, 2**32 - 1))
def test_compiled_knapsack_is_the_numpy_one(L, R, sizes, cap_frac, seed):
    ds, rng = distance_set(None, L), np.random.default_rng(seed)
    dev = _device_layers(L, ds).astype(float)
    pick = rng.integers(0, sizes, R)  # few distinct sizes: ties in the sort, kept in request order
    load, e = rng.exponential(1.0, sizes)[pick], rng.integers(256, 131072, sizes)[pick].astype(float)
    m = rng.integers(0, 4, len(ds)).astype(float)
    cap = cap_frac * float(e.sum() * dev.max())
    value, ks, frac = knapsack_bound(load, e, dev, cap, m)
    want_value, want_ks, want_frac = knapsack_numpy(load, e, dev, cap, m)
    assert value == want_value and np.array_equal(ks, want_ks) and frac == want_frac


def _batch(rng, R: int, L: int) -> PlanInputs:
    reqs = [PlanRequest(f"r{i}", int(rng.integers(4096, 131072)), int(rng.integers(16, 2048)),
                        L * 3e-4 * float(rng.choice([1.0, 1.5, 2.5])), int(rng.integers(0, 17))) for i in range(R)]
    demand = sum(r.context_tokens + r.growth(32) for r in reqs) * L * 4096
    return PlanInputs(reqs, L, 4096, int(demand * rng.uniform(0.6, 0.98)), 25e9, 0.27e-3, 2.4e-9)


def test_a_solve_never_compiles():
    kernels = (linkjit._stall_rows, linkjit._improve_round, linkjit._path, linkjit._chain, linkjit.knapsack)
    before = [len(k.signatures) for k in kernels]
    assert all(before)  # the import warmed every kernel up
    rng = np.random.default_rng(0)
    for warm in (False, True):
        planner = FastPlanner(warm_start=warm)
        for R, L in ((2, 32), (12, 32), (32, 32), (48, 80)):  # enumerated, branch and bound, greedy
            planner.solve(_batch(rng, R, L))
    assert [len(k.signatures) for k in kernels] == before
