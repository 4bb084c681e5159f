"""The fast path's and the step models' loops as they were in numpy / Python before they were compiled
(planner/linkjit.py): the references tests/test_fastpath_jit.py checks the compiled ones against,
bit for bit (the same plans)."""

from __future__ import annotations

import operator
from typing import Sequence

import numpy as np

from orbitflow_ray.kv.prefetch import issue_limit
from orbitflow_ray.planner.fastpath import BATCH_SLACK, GREEDY_REACH, Chain, LinkEval, knapsack_bound, size_partners
from orbitflow_ray.planner.problem import PlanInputs, _host_layers


def _moved(Y, ks, load, rr, kk) -> np.ndarray:
    Ys = np.repeat(Y[None], len(rr), 0)
    idx = np.arange(len(rr))
    Ys[idx, ks[rr]] -= load[rr]
    Ys[idx, kk] += load[rr]
    return Ys


def _swapped(Y, ks, load, r: int, q: int) -> np.ndarray:
    Ys = Y[None].copy()
    Ys[0, ks[r]] += load[q] - load[r]
    Ys[0, ks[q]] += load[r] - load[q]
    return Ys


def offload_greedy_numpy(link: LinkEval, load, e, dev, cap, ks) -> np.ndarray:
    """Offload more until the plan fits: rank every move by stall added per capacity freed (the
    part of it still needed), then apply the best prefix of the per-request best moves."""
    ks, by_dev = ks.copy(), np.argsort(-dev, kind="stable")
    while (over := int(e @ dev[ks]) - cap) > 0:
        Y = np.bincount(ks, weights=load, minlength=len(dev))
        F = link.stall(Y[None])[0]
        # the next few classes with fewer device layers (classes tied with a request's own skipped)
        first = np.searchsorted(-dev[by_dev], -dev[ks], side="right")
        nxt = first[:, None] + np.arange(GREEDY_REACH)
        rr, col = np.nonzero(nxt < len(dev))
        kk = by_dev[nxt[rr, col]]
        freed = e[rr] * (dev[ks[rr]] - dev[kk])
        score = (link.stall(_moved(Y, ks, load, rr, kk)) - F) / np.minimum(freed, over)
        order = np.argsort(score, kind="stable")
        _, first = np.unique(rr[order], return_index=True)
        mv = order[np.sort(first)]
        step = np.zeros((len(mv), len(dev)))
        step[np.arange(len(mv)), ks[rr[mv]]] -= load[rr[mv]]
        step[np.arange(len(mv)), kk[mv]] += load[rr[mv]]
        Fp, got = link.stall(Y + np.cumsum(step, 0)), np.cumsum(freed[mv])
        ratio = (Fp - F) / np.minimum(got, over)
        ok = np.flatnonzero(ratio <= ratio.min() + abs(ratio.min()) * BATCH_SLACK + 1e-12)
        reach = ok[got[ok] >= over]
        p = int(reach[np.argmin(Fp[reach])]) if len(reach) else int(ok.max())
        ks[rr[mv[:p + 1]]] = kk[mv[:p + 1]]
    return ks


def improve_numpy(link: LinkEval, load, e, dev, cap, ks, rounds: int = 12, partners: int = 6) -> np.ndarray:
    """Steepest descent over single moves and swaps of requests close in size, within capacity."""
    ks = ks.copy()
    p_r, p_q = size_partners(load, partners)
    for _ in range(rounds):
        Y = np.bincount(ks, weights=load, minlength=len(dev))
        F, slack = link.stall(Y[None])[0], cap - int(e @ dev[ks])
        n, n_moves, b, Fb, r, x = improve_round_numpy(link, Y, ks, load, e, dev, slack, p_r, p_q)
        if not n:
            break
        if n == 1:  # one vector alone: numpy's sum (linkjit's docstring)
            Ys = _moved(Y, ks, load, np.array([r]), np.array([x])) if n_moves else _swapped(Y, ks, load, r, x)
            Fb = link.stall(Ys)[0]
        if Fb >= F - 1e-12 * (len(link.by_end) + F):  # the path's layers, as compiled
            break
        if b < n_moves:
            ks[r] = x
        else:
            ks[r], ks[x] = ks[x], ks[r]
    return ks


def reclaim_numpy(link: LinkEval, load, e, dev, cap, ks, stall_cap: float, partners: int = 6) -> np.ndarray:
    """Fewer link bytes at a tie: move requests to classes with fewer host layers, or swap the
    classes of two requests close in size so the larger one moves less, while the plan fits and
    its stall stays within `stall_cap`. Greedy (most bytes saved first), so not always the least."""
    ks, pairs = ks.copy(), size_partners(load, partners)
    while _reclaim_moves(link, load, e, dev, cap, ks, stall_cap) \
            or _reclaim_swap(link, load, e, dev, cap, ks, stall_cap, *pairs):
        pass
    return ks


def _reclaim_moves(link: LinkEval, load, e, dev, cap, ks, stall_cap: float) -> bool:
    """Single moves, in place: every request's best move that is feasible alone, ranked by bytes
    saved, applied as the longest prefix that is still feasible together. False: none applies."""
    host, Y = link.L - dev, np.bincount(ks, weights=load, minlength=len(dev))
    slack = cap - int(e @ dev[ks])
    rr, kk = np.nonzero(host[None, :] < host[ks][:, None])
    ok = e[rr] * (dev[kk] - dev[ks[rr]]) <= slack
    rr, kk = rr[ok], kk[ok]
    if len(rr):
        ok = link.stall(_moved(Y, ks, load, rr, kk)) <= stall_cap
        rr, kk = rr[ok], kk[ok]
    if not len(rr):
        return False
    order = np.argsort(-load[rr] * (host[ks[rr]] - host[kk]), kind="stable")
    _, first = np.unique(rr[order], return_index=True)
    mv = order[np.sort(first)]
    step = np.zeros((len(mv), len(dev)))
    step[np.arange(len(mv)), ks[rr[mv]]] -= load[rr[mv]]
    step[np.arange(len(mv)), kk[mv]] += load[rr[mv]]
    fine = (link.stall(Y + np.cumsum(step, 0)) <= stall_cap) \
        & (np.cumsum(e[rr[mv]] * (dev[kk[mv]] - dev[ks[rr[mv]]])) <= slack)
    n = len(mv) if fine.all() else max(1, int(np.argmin(fine)))  # the first is feasible alone
    ks[rr[mv[:n]]] = kk[mv[:n]]
    return True


def _reclaim_swap(link: LinkEval, load, e, dev, cap, ks, stall_cap: float, small, large) -> bool:
    """The feasible swap saving the most bytes, in place: the larger request takes the smaller
    one's class where that has fewer host layers. False: none applies."""
    host = link.L - dev
    saved = (load[large] - load[small]) * (host[ks[large]] - host[ks[small]])
    room = (e[large] - e[small]) * (dev[ks[small]] - dev[ks[large]]) <= cap - int(e @ dev[ks])
    ok = (saved > 0) & room
    r, q = small[ok], large[ok]
    if not len(r):
        return False
    Ys = np.repeat(np.bincount(ks, weights=load, minlength=len(dev))[None], len(r), 0)
    idx = np.arange(len(r))
    Ys[idx, ks[r]] += load[q] - load[r]
    Ys[idx, ks[q]] += load[r] - load[q]
    fine = np.flatnonzero(link.stall(Ys) <= stall_cap)
    if not len(fine):
        return False
    b = fine[np.argmax(saved[ok][fine])]
    ks[r[b]], ks[q[b]] = ks[q[b]], ks[r[b]]
    return True


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
    need, P = link.counts @ Y - link.span, len(link.by_end)  # the path's layers (L + 1 with copies)
    U, arg = np.zeros(P + 1), np.full(P + 1, -1)
    for j, g in enumerate(link.by_end):
        U[j + 1] = U[j]
        if g.stop > g.start:
            i = g.start + int(np.argmax(U[link.a[g]] + need[g]))
            if U[link.a[i]] + need[i] > U[j]:
                U[j + 1], arg[j + 1] = U[link.a[i]] + need[i], i
    m, s, j = np.zeros(link.counts.shape[1]), 0.0, P
    while j > 0:
        if arg[j] < 0:
            j -= 1
        else:
            m, s, j = m + link.counts[arg[j]], s + link.span[arg[j]], link.a[arg[j]]
    return m, s, U


def stall_s_python(counts: np.ndarray, loads: np.ndarray, c: float, bw: float) -> float:
    """Least total stall under the EDF link model: U[b+1] = max(U[b], max_a U[a] + need(a, b)),
    U[j+1] the stall accumulated up to and including layer j (a longest path, so exact)."""
    L = counts.shape[0]
    need = counts @ loads / bw - (np.arange(L)[None, :] - np.arange(L)[:, None]) * c
    U = [0.0]  # Python floats: the same double sums as numpy, without a numpy call per layer
    for b, col in enumerate(need.T.tolist()):
        U.append(max(U[b], max(map(operator.add, U, col))))  # U has b + 1 entries: a <= b
    return U[L]


def engine_step_time_python(inputs: PlanInputs, distances: Sequence[int], prefetch_depth: int) -> float:
    """T in seconds as the engine runs the placement (`kv/store.py`, mirrored by `sim/executor.py`),
    not as the EDF link model (`step_time`) bounds it: at the start of each layer, the copies of the
    batch's host layers (the union over its requests, one copy per layer carrying every request's KV
    of it) are issued in layer order up to the `prefetch_depth + 1`-th host layer at or after it,
    onto one FIFO link; a host layer waits for its copy, computes, and queues the write-back of the
    block each request's new token touched; the step's tail (`PlanInputs.step_tail_s`, part of
    L * c) runs after the last layer, where no copy overlaps it. A request at a long distance then shares its copy with
    the short-distance requests offloading the same layer, and its copy is issued only when that
    layer comes into the union's lookahead: later than its own window. Equal to `step_time` when
    every request has one distance (up to the write-backs and blocks), up to a quarter above it
    in batches that mix them. The link is taken idle at the top of the step."""
    L, kvb, bs = inputs.num_layers, inputs.kv_bytes_per_token_per_layer, inputs.block_size
    loads: dict[int, int] = {}
    backs: dict[int, int] = {}
    for r, d in zip(inputs.requests, distances):
        for h in _host_layers(min(int(d), L), L):
            loads[h] = loads.get(h, 0) + -(-r.context_tokens // bs) * bs * kvb
            backs[h] = backs.get(h, 0) + bs * kvb
    order = sorted(loads)
    tail = min(inputs.step_tail_s, L * inputs.compute_per_layer_s)
    c, bw = inputs.compute_per_layer_s - tail / L, inputs.link_bytes_per_s
    now = link = 0.0
    ready: dict[int, float] = {}
    issued = 0
    for layer in range(L):
        while issued < issue_limit(order, layer, prefetch_depth):
            h = order[issued]
            link = max(link, now) + loads[h] / bw
            ready[h] = link
            issued += 1
        now = max(now, ready.get(layer, now)) + c
        if layer in loads:
            link = max(link, now) + backs[layer] / bw
    return now + tail


def lower_bound_numpy(link: LinkEval, load, e, dev, cap, seeds: list[Chain] | None = None,
                iters: int = 8) -> tuple[float, list[Chain]]:
    """Best single-chain knapsack bound on the stall, and the chains tried. Without seeds it
    starts from the whole-step interval (0, last deadline) and follows critical chains."""
    if seeds:
        return max(0.0, max(knapsack_bound(load, e, dev, cap, m)[0] - s for m, s in seeds)), seeds
    m, s = link.whole_m, link.last_deadline
    best, tried = 0.0, []
    for _ in range(iters):
        value, ks, _ = knapsack_bound(load, e, dev, cap, m)
        best = max(best, value - s)
        tried.append((m, s))
        m, s, _ = link.chain(np.bincount(ks, weights=load, minlength=len(dev)))
        if any(s == s2 and np.array_equal(m, m2) for m2, s2 in tried):
            break
    return best, tried


def branch_and_bound_numpy(link: LinkEval, load, e, dev, cap, chains: list[Chain], ks, rel_gap: float,
                     max_nodes: int = 48) -> tuple[np.ndarray, bool]:
    """Depth-first search over requests' classes from incumbent `ks`. A node's bound is the best
    chain knapsack over its free requests (chains grow with every critical chain met); it branches
    on the knapsack's fractional request. Stops after `max_nodes` nodes (a count, not a clock: the
    plan is the same on a busy machine). True when every node was pruned (optimal within rel_gap)."""
    ef, devf = e.astype(float), dev.astype(float)
    L, K = link.L, len(dev)
    best = link.stall(np.bincount(ks, weights=load, minlength=K)[None])[0]
    stack, nodes = [np.full(len(load), -1)], 0
    while stack and nodes < max_nodes:
        nodes += 1
        fixed = stack.pop()
        free = fixed < 0
        left = float(cap - e[~free] @ dev[fixed[~free]])
        if left < ef[free].sum() * devf.min():
            continue
        Yfix = np.bincount(fixed[~free], weights=load[~free], minlength=K)
        bound, arg = -np.inf, None
        for m, s in chains:
            value, kfree, frac = knapsack_bound(load[free], ef[free], devf, left, m)
            if value + Yfix @ m - s > bound:
                bound, arg = value + Yfix @ m - s, (kfree, frac)
        if L + max(bound, 0.0) >= (L + best) / (1 + rel_gap):
            continue
        cand = fixed.copy()
        cand[free] = arg[0]
        m, s, U = link.chain(np.bincount(cand, weights=load, minlength=K))
        if U[-1] < best:
            best, ks = U[-1], cand
        if not any(s == s2 and np.array_equal(m, m2) for m2, s2 in chains):
            chains.append((m, s))
            stack.append(fixed)  # re-bound this node with the new chain
            continue
        if not free.any():
            continue
        r = np.flatnonzero(free)[arg[1]] if arg[1] >= 0 else np.flatnonzero(free)[np.argmax(load[free])]
        for k in np.argsort(-np.abs(np.arange(K) - cand[r])):  # the rounded class is tried first
            child = fixed.copy()
            child[r] = k
            stack.append(child)
    return ks, not stack
