"""The planner's hot loops, compiled (Numba): `fastpath` and `problem` call these.

The link stall of a class-load vector is a longest path over the critical intervals
(`problem.critical_intervals`); the fast path evaluates it for thousands of candidate placements
per solve. Here: the stall of a batch of vectors (`_stall_rows`: SIMD across the vectors; a few
at a time in fixed-width blocks, `_stall_small`), the critical chain of one (`_chain`), a whole
round of `improve` (`_improve_round`) and the searches around it (`_greedy`, `_improve`,
`_reclaim`, `lower_bound_chains`, `branch_and_bound`), the knapsack bound past its hull
(`knapsack`, `knapsacks`, `hull`), and the exact model's per-layer loops (`edf_stall` for
`problem.step_time`, `engine_step` for `problem.engine_step_time`).

Same numbers as the numpy code they replace, so the same plans: `need` sums count_k * Y_k over k in
class order from zero (what numpy's einsum does for two or more vectors; terms with a zero count
add exactly zero, so they are skipped), the longest path takes the same maxima, and cumulative sums
and the stable sort run in numpy's order. Where numpy rounds otherwise it is reproduced: one
vector alone numpy's einsum sums in two SIMD lanes (`_dot_one`, this numpy build's baseline loop),
array sums are pairwise (`pairwise_sum`), `@` of a matrix or two vectors goes through BLAS (here
`np.dot`, the same BLAS routine), and argsort ties come from numpy itself (a table the caller
passes). `_improve_round` returns the first least stall, as numpy's argmin: it scores only the
candidates whose lower bound (the current plan's critical chain evaluated at each candidate: a
path, so never above its stall) is not over the least stall found, by a margin far above
rounding. tests/test_fastpath_jit.py checks each against numpy (tests/fastpath_reference.py), and
fails if a numpy, BLAS or machine change breaks one of these equalities.

Compiled single-threaded (`nogil`, no `parallel`: the decode thread must not start a pool), cached
on disk beside this file where that is writable, and warmed up when this module is imported for
every signature a solve uses, so a solve never compiles: the first import compiles (about 28 s of
CPU on the shared 2-core box; `make install` does it, so a fresh checkout's first `serve run` or test
does not; every process compiles again where the cache is not writable), later ones load the cache
(numba's import about 0.25 s of CPU, the fast path's import 0.75 s).
"""

from __future__ import annotations


import numpy as np

# Numba fixes its thread pool's size (NUMBA_NUM_THREADS, default every CPU) when first imported, and
# the planner is often what imports it first. The planner's loops run no pool; the pool is the
# decode-attention kernel's (kernels/orbitflow_kernels/numba_kernel.py), which runs on torch's
# intra-op thread count at each call, capped at this size. So the planner leaves the size alone:
# sizing it from torch's threads here froze it at 1 in a serving replica (Ray sets 1 thread for a
# 1-CPU replica) before the app raised torch's threads to 2, and the kernel then failed.
from numba import njit  # noqa: E402


@njit(cache=True, nogil=True)
def _path(need, a, group, out_u):  # pragma: no cover - compiled
    # need [I] per interval (grouped by end layer: group[j]:group[j+1] end at j), a [I] first layers;
    # out_u [L + 1]: U[j + 1] the least stall through layer j. Returns U[L].
    L = len(group) - 1
    out_u[0] = 0.0
    for j in range(L):
        u = out_u[j]
        for i in range(group[j], group[j + 1]):
            v = out_u[a[i]] + need[i]
            if v > u:
                u = v
        out_u[j + 1] = u
    return out_u[L]


CHUNK = 128  # vectors per pass: need [I, CHUNK] and U [L + 1, CHUNK] stay in cache


BLOCK, SMALL = 8, 24  # up to SMALL vectors go BLOCK at a time through fixed-width loops


@njit(cache=True, nogil=True)
def _stall_small(counts, span, a, group, YT, out):  # pragma: no cover - compiled
    # `_stall_rows` for a few vectors: BLOCK columns at a time (the last block padded with copies
    # of its first column), loops of a fixed width the compiler unrolls; the same sums and maxima.
    n_int, n_cls = counts.shape
    L, N = len(group) - 1, YT.shape[1]
    y = np.empty((n_cls, BLOCK))
    need = np.empty((n_int, BLOCK))
    u = np.empty((L + 1, BLOCK))
    for lo in range(0, N, BLOCK):
        w = min(BLOCK, N - lo)
        for k in range(n_cls):
            for n in range(BLOCK):
                y[k, n] = YT[k, lo + n] if n < w else YT[k, lo]
        for i in range(n_int):
            for n in range(BLOCK):
                need[i, n] = 0.0
            for k in range(n_cls):
                c = counts[i, k]
                if c != 0.0:
                    for n in range(BLOCK):
                        need[i, n] += c * y[k, n]
            for n in range(BLOCK):
                need[i, n] -= span[i]
        for n in range(BLOCK):
            u[0, n] = 0.0
        for j in range(L):
            for n in range(BLOCK):
                u[j + 1, n] = u[j, n]
            for i in range(group[j], group[j + 1]):
                ai = a[i]
                for n in range(BLOCK):
                    v = u[ai, n] + need[i, n]
                    if v > u[j + 1, n]:
                        u[j + 1, n] = v
        for n in range(w):
            out[lo + n] = u[L, n]


@njit(cache=True, nogil=True)
def _stall_rows(counts, span, a, group, YT, out):  # pragma: no cover - compiled
    # counts [I, K]; YT [K, N] (class loads, one column per vector); out [N]: each column's stall.
    # The vectors run in the innermost loops (SIMD across vectors, each sum still in class order).
    n_int, n_cls = counts.shape
    L = len(group) - 1
    if YT.shape[1] == 1:  # the same sums, without the SIMD layout's overhead
        need = np.empty(n_int)
        for i in range(n_int):
            acc = 0.0
            for k in range(n_cls):
                if counts[i, k] != 0.0:
                    acc += counts[i, k] * YT[k, 0]
            need[i] = acc - span[i]
        out[0] = _path(need, a, group, np.empty(L + 1))
        return
    if YT.shape[1] <= SMALL:
        _stall_small(counts, span, a, group, YT, out)
        return
    need = np.empty((n_int, CHUNK))
    u = np.empty((L + 1, CHUNK))
    for lo in range(0, YT.shape[1], CHUNK):
        w = min(CHUNK, YT.shape[1] - lo)
        for i in range(n_int):
            row = need[i]
            for n in range(w):
                row[n] = 0.0
            for k in range(n_cls):
                c = counts[i, k]
                if c != 0.0:
                    y = YT[k, lo:lo + w]
                    for n in range(w):
                        row[n] += c * y[n]
            s = span[i]
            for n in range(w):
                row[n] -= s
        for n in range(w):
            u[0, n] = 0.0
        for j in range(L):
            dst, src = u[j + 1], u[j]
            for n in range(w):
                dst[n] = src[n]
            for i in range(group[j], group[j + 1]):
                ua, nd = u[a[i]], need[i]
                for n in range(w):
                    v = ua[n] + nd[n]
                    if v > dst[n]:
                        dst[n] = v
        for n in range(w):
            out[lo + n] = u[L, n]


@njit(cache=True, nogil=True)
def _chain_path(need, a, group, out_u, arg):  # pragma: no cover - compiled
    # `_path` that also records, per layer, the interval that set U there (-1: U carried over);
    # ties keep the first interval of the group, as numpy's argmax does.
    L = len(group) - 1
    out_u[0] = 0.0
    arg[0] = -1
    for j in range(L):
        out_u[j + 1], arg[j + 1] = out_u[j], -1
        best, at = -np.inf, -1
        for i in range(group[j], group[j + 1]):
            v = out_u[a[i]] + need[i]
            if v > best:
                best, at = v, i
        if at >= 0 and best > out_u[j]:
            out_u[j + 1], arg[j + 1] = best, at


@njit(cache=True, nogil=True)
def _chain(counts, span, a, group, need):  # pragma: no cover - compiled
    # (m_C [K], s_C, U [L + 1]) of the critical chain: `_chain_path`, then the walk back from the
    # last layer summing the chain's count rows and spans in that order (as `LinkEval.chain` did).
    u, arg = np.empty(len(group)), np.empty(len(group), dtype=np.int64)
    _chain_path(need, a, group, u, arg)
    m, s, j = np.zeros(counts.shape[1]), 0.0, len(group) - 1
    while j > 0:
        if arg[j] < 0:
            j -= 1
        else:
            m = m + counts[arg[j]]
            s = s + span[arg[j]]
            j = a[arg[j]]
    return m, s, u


@njit(cache=True, nogil=True)
def _improve_round(counts, span, a, group, Y, ks, load, e, dev, slack, p_r, p_q):  # pragma: no cover
    # One round of `fastpath.improve`: every single move and swap that fits (`slack` device
    # token-layers), in its order (moves by request then class, then the swaps). Returns
    # (candidates, of them moves, index of the first least stall, that stall, its request, and its
    # class (a move) or partner (a swap)). Scores as few as it can: the critical chain of Y
    # (intervals m_C, compute s_C) bounds each candidate's stall from below (stall >= m_C . y - s_C,
    # a path; from Y's value and the candidate's two changed classes); the least bound is scored
    # first, then the candidates whose bound is not over that stall, in order of their bounds, until
    # the next bound is over the least stall found (by a margin far above rounding): every
    # candidate that can reach the least stall is scored, ties to the first index. Each is scored
    # as `_stall_rows` scores it (class order), so the answer is the numpy round's over all
    # candidates (tests/test_fastpath_jit.py).
    K = len(Y)
    need = np.empty(len(span))
    for i in range(len(span)):
        acc = 0.0
        for k in range(K):
            acc += counts[i, k] * Y[k]
        need[i] = acc - span[i]
    m, s, _ = _chain(counts, span, a, group, need)
    return _round_on_chain(counts, span, a, group, Y, ks, load, e, dev, slack, p_r, p_q, m, s)


@njit(cache=True, nogil=True)
def _round_on_chain(counts, span, a, group, Y, ks, load, e, dev, slack, p_r, p_q, m, s):  # pragma: no cover
    # `_improve_round` bounding by the chain (m, s) of Y: any chain of Y bounds each candidate's
    # stall from below, so which one only changes how many are scored, never the answer.
    R, K = len(ks), len(Y)
    n_sw = len(p_r)
    who = np.empty((R * (K - 1) + n_sw, 2), dtype=np.int64)
    n = 0
    for r in range(R):
        for k in range(K):
            if k != ks[r] and e[r] * (dev[k] - dev[ks[r]]) <= slack:
                who[n, 0], who[n, 1] = r, k
                n += 1
    n_mv = n
    for t in range(n_sw):
        r, q = p_r[t], p_q[t]
        if ks[r] != ks[q] and (e[r] - e[q]) * (dev[ks[q]] - dev[ks[r]]) <= slack:
            who[n, 0], who[n, 1] = r, q
            n += 1
    if n == 0:
        return 0, 0, -1, 0.0, -1, -1
    base = -s
    for k in range(K):
        base += m[k] * Y[k]
    lb = np.empty(n)
    for c in range(n):
        r, x = who[c, 0], who[c, 1]
        if c < n_mv:
            lb[c] = base + (m[x] - m[ks[r]]) * load[r]
        else:
            lb[c] = base + (m[ks[r]] - m[ks[x]]) * (load[x] - load[r])
    buf, out = np.empty((K, SCORE_CHUNK)), np.empty(SCORE_CHUNK)
    first = np.argmin(lb)
    _candidate(buf, 0, Y, ks, load, who, first, n_mv)
    _stall_rows(counts, span, a, group, buf[:, :1], out)
    b, best = first, out[0]
    near = np.empty(n, dtype=np.int64)  # the others whose bound is not over it, by bound
    m_near = 0
    for c in range(n):
        if c != first and lb[c] - 1e-9 * (1.0 + abs(lb[c]) + s) <= best:
            near[m_near] = c
            m_near += 1
    near = near[:m_near][np.argsort(lb[near[:m_near]], kind="mergesort")]
    for lo in range(0, m_near, SCORE_CHUNK):
        if lb[near[lo]] - 1e-9 * (1.0 + abs(lb[near[lo]]) + s) > best:
            break
        w = min(SCORE_CHUNK, m_near - lo)
        for t in range(w):
            _candidate(buf, t, Y, ks, load, who, near[lo + t], n_mv)
        _stall_rows(counts, span, a, group, buf[:, :w], out)
        for t in range(w):
            c = near[lo + t]
            if out[t] < best or (out[t] == best and c < b):
                b, best = c, out[t]
    return n, n_mv, b, best, who[b, 0], who[b, 1]


SCORE_CHUNK = 8  # candidates scored per pass in `_improve_round`


@njit(cache=True, nogil=True)
def _candidate(buf, w, Y, ks, load, who, c, n_mv):  # pragma: no cover - compiled
    # Column w of buf: Y after candidate c of `_improve_round` (a move, or a swap past n_mv).
    r, x = who[c, 0], who[c, 1]
    buf[:, w] = Y
    if c < n_mv:
        buf[ks[r], w] -= load[r]
        buf[x, w] += load[r]
    else:
        buf[ks[r], w] += load[x] - load[r]
        buf[ks[x], w] += load[r] - load[x]


@njit(cache=True, nogil=True)
def knapsack(load, e, dev, cap, m, hull, load_sum, e_sum):  # pragma: no cover - compiled
    """`fastpath.knapsack_bound` past its hull (the same operations in the same order; numpy's
    pairwise sums `load_sum`, `e_sum` come from the caller). Returns (value, hull position per
    request, the fractional request or -1)."""
    pos = np.zeros(len(load), dtype=np.int64)
    weight, value = e_sum * dev[hull[0]], load_sum * m[hull[0]]
    if len(hull) == 1 or weight <= cap:
        return value, pos, -1
    H, R = len(hull) - 1, len(load)
    key = np.empty(R * H)
    for r in range(R):
        ratio = load[r] / e[r]
        for h in range(H):
            key[r * H + h] = (m[hull[h + 1]] - m[hull[h]]) / (dev[hull[h]] - dev[hull[h + 1]]) * ratio
    order = np.argsort(key, kind="mergesort")  # stable, as numpy's "stable"
    save, cost = np.empty(len(order)), np.empty(len(order))
    s_acc = c_acc = 0.0
    for t in range(len(order)):
        r, h = order[t] // H, order[t] % H
        s_acc += e[r] * (dev[hull[h]] - dev[hull[h + 1]])
        c_acc += load[r] * (m[hull[h + 1]] - m[hull[h]])
        save[t], cost[t] = s_acc, c_acc
    n = min(np.searchsorted(save, weight - cap), len(order) - 1)
    prev_save, prev_cost = (save[n - 1], cost[n - 1]) if n else (0.0, 0.0)
    value += prev_cost + (cost[n] - prev_cost) * (weight - cap - prev_save) / (save[n] - prev_save)
    for t in range(n + 1):
        pos[order[t] // H] += 1
    return value, pos, order[n] // H


@njit(cache=True, nogil=True)
def hull(dev, m):  # pragma: no cover - compiled
    """`fastpath._hull`: the lower convex hull of (dev, m) towards less device memory (class
    indices), from the least m (then least dev, then first); the same comparisons."""
    K = len(dev)
    cur = 0
    for k in range(1, K):
        if m[k] < m[cur] or (m[k] == m[cur] and dev[k] < dev[cur]):
            cur = k
    out = np.empty(K, dtype=np.int64)
    out[0], n = cur, 1
    slope = np.empty(K)
    while True:
        lo, found = np.inf, False
        for k in range(K):
            if dev[k] < dev[cur]:
                slope[k] = (m[k] - m[cur]) / (dev[cur] - dev[k])
                lo = min(lo, slope[k])
                found = True
        if not found:
            return out[:n]
        nxt = -1
        for k in range(K):
            if dev[k] < dev[cur] and slope[k] <= lo + 1e-12 and (nxt < 0 or dev[k] < dev[nxt]):
                nxt = k
        out[n], n, cur = nxt, n + 1, nxt


@njit(cache=True, nogil=True)
def lower_bound_chains(counts, span, a, group, load, e, dev, cap, m0, s0, iters, load_sum, e_sum):  # pragma: no cover
    """`fastpath.lower_bound` without seeds: from chain (m0, s0), the knapsack bound of each chain
    and the critical chain of its rounding, until a chain comes back or `iters` are tried. Returns
    (best bound, chains' m [n, K], their s [n]). The chain's need is `counts @ Y` through BLAS,
    as numpy's matmul computes it (tests/test_fastpath_jit.py); numpy's pairwise sums `load_sum`,
    `e_sum` come from the caller."""
    K = len(dev)
    M, S = np.empty((iters, K)), np.empty(iters)
    m, s, best, n = m0.copy(), s0, 0.0, 0
    for _ in range(iters):
        h = hull(dev, m)
        value, pos, _ = knapsack(load, e, dev, cap, m, h, load_sum, e_sum)
        best = max(best, value - s)
        M[n], S[n] = m, s
        n += 1
        Y = np.zeros(K)
        for r in range(len(load)):
            Y[h[pos[r]]] += load[r]
        m, s, _ = _chain(counts, span, a, group, np.dot(counts, Y) - span)
        seen = False
        for t in range(n):
            if S[t] == s and np.array_equal(M[t], m):
                seen = True
                break
        if seen:
            break
    return best, M[:n], S[:n]


@njit(cache=True, nogil=True)
def pairwise_sum(x):  # pragma: no cover - compiled
    """numpy's sum of a float64 array (pairwise: 8 partial sums in blocks of up to 128, halves above);
    tests/test_fastpath_jit.py checks it against numpy's bit for bit."""
    n = len(x)
    if n < 8:
        res = 0.0
        for i in range(n):
            res += x[i]
        return res
    if n <= 128:
        r = x[:8].copy()
        i = 8
        while i < n - n % 8:
            for j in range(8):
                r[j] += x[i + j]
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        while i < n:
            res += x[i]
            i += 1
        return res
    half = n // 2
    half -= half % 8
    return pairwise_sum(x[:half]) + pairwise_sum(x[half:])


@njit(cache=True, nogil=True)
def branch_and_bound(counts, span, a, group, load, e, dev, cap, M0, S0, ks0, rel_gap, max_nodes,
                     child_order, num_layers):  # pragma: no cover - compiled
    """`fastpath.branch_and_bound` (its numpy version is tests/test_fastpath_jit.py's reference):
    the same nodes in the same order, the same numbers (numpy's pairwise sums, BLAS dots and
    matrix-vector products, one-vector stall). M0 [C0, K] / S0 [C0]: the chains so far;
    child_order [K, K]: the order children are pushed for a rounded class (numpy's argsort);
    num_layers: the model's layers L (T = L + stall in compute layers, what the proof's gap is
    on; the path has one more, virtual, where copies cost compute: `fastpath.LinkEval`).
    Returns (best placement, proven: every node pruned, new chains' m [n, K], their s [n])."""
    R, K, L, P = len(load), len(dev), num_layers, len(group) - 1
    ef, devf = e.astype(np.float64), dev.astype(np.float64)
    dev_min = devf.min()
    rows = len(S0) + max_nodes + 1
    M, S = np.empty((rows, K)), np.empty(rows)
    H, NH = np.zeros((rows, K), dtype=np.int64), np.zeros(rows, dtype=np.int64)
    C = len(S0)
    for c in range(C):
        M[c], S[c] = M0[c], S0[c]
        h = hull(devf, M[c])
        H[c, :len(h)], NH[c] = h, len(h)
    ks = ks0.copy()
    best = _stall_one(counts, span, a, group, _loads(ks, load, K))
    stack = np.empty((1 + max_nodes * K, R), dtype=np.int64)
    stack[0] = -1
    top, nodes = 1, 0
    while top > 0 and nodes < max_nodes:
        nodes += 1
        top -= 1
        fixed = stack[top].copy()
        free = np.flatnonzero(fixed < 0)
        used = 0
        Yfix = np.zeros(K)
        for r in range(R):
            if fixed[r] >= 0:
                used += e[r] * dev[fixed[r]]
                Yfix[fixed[r]] += load[r]
        left = float(cap - used)
        lf, e_free = load[free], ef[free]
        e_sum = pairwise_sum(e_free)
        if left < e_sum * dev_min:
            continue
        l_sum = pairwise_sum(lf)
        bound, arg, arg_frac = -np.inf, -1, -1
        arg_pos = np.zeros(len(free), dtype=np.int64)
        for c in range(C):
            value, pos, frac = knapsack(lf, e_free, devf, left, M[c], H[c, :NH[c]], l_sum, e_sum)
            tot = value + np.dot(Yfix, M[c]) - S[c]
            if tot > bound:
                bound, arg, arg_frac, arg_pos = tot, c, frac, pos
        if arg < 0:
            raise ValueError("branch_and_bound needs at least one chain")
        if L + max(bound, 0.0) >= (L + best) / (1 + rel_gap):
            continue
        cand = fixed.copy()
        for t in range(len(free)):
            cand[free[t]] = H[arg, arg_pos[t]]
        m, s, U = _chain(counts, span, a, group, np.dot(counts, _loads(cand, load, K)) - span)
        if U[P] < best:
            best, ks = U[P], cand
        seen = False
        for t in range(C):
            if S[t] == s and np.array_equal(M[t], m):
                seen = True
                break
        if not seen:
            M[C], S[C] = m, s
            h = hull(devf, m)
            H[C, :len(h)], NH[C] = h, len(h)
            C += 1
            stack[top] = fixed  # re-bound this node with the new chain
            top += 1
            continue
        if len(free) == 0:
            continue
        if arg_frac >= 0:
            r = free[arg_frac]
        else:
            r = free[np.argmax(lf)]
        for k in child_order[cand[r]]:  # the rounded class is tried first
            stack[top] = fixed
            stack[top, r] = k
            top += 1
    return ks, top == 0, M[len(S0):C].copy(), S[len(S0):C].copy()


@njit(cache=True, nogil=True)
def knapsacks(load, e, dev, cap, M, hulls, n_hull, load_sum, e_sum):  # pragma: no cover - compiled
    """`knapsack` for each chain: M [C, K] their m, hulls [C, K] their hulls (the first n_hull[c]
    entries). Returns (values [C], hull positions [C, R], fractional requests [C])."""
    C = M.shape[0]
    values, pos, frac = np.empty(C), np.empty((C, len(load)), dtype=np.int64), np.empty(C, dtype=np.int64)
    for c in range(C):
        values[c], pos[c], frac[c] = knapsack(load, e, dev, cap, M[c], hulls[c, :n_hull[c]], load_sum, e_sum)
    return values, pos, frac


@njit(cache=True, nogil=True)
def _dot_one(x, y):  # pragma: no cover - compiled
    # numpy's einsum sum of products for one vector ("ik,kn->in", n = 1), as this numpy build runs
    # it (its baseline SIMD: two lanes, no fused multiply-add, blocks of 8 read back to front, then
    # pairs, zero-filled; the lanes summed, then added to the zeroed output). tests/test_fastpath_jit.py
    # checks it against np.einsum bit for bit.
    acc0 = acc1 = 0.0
    n, i = len(x), 0
    while n - i >= 8:
        for j in (6, 4, 2, 0):
            acc0 = x[i + j] * y[i + j] + acc0
            acc1 = x[i + j + 1] * y[i + j + 1] + acc1
        i += 8
    while i < n:
        acc0 = x[i] * y[i] + acc0
        acc1 = (x[i + 1] * y[i + 1] if i + 1 < n else 0.0 * 0.0) + acc1
        i += 2
    return (acc0 + acc1) + 0.0


@njit(cache=True, nogil=True)
def _stall_one(counts, span, a, group, y):  # pragma: no cover - compiled
    # `CompiledLink.stall` of one vector: numpy's one-vector need (`_dot_one`), then the path.
    need = np.empty(len(span))
    for i in range(len(span)):
        need[i] = _dot_one(counts[i], y) - span[i]
    return _path(need, a, group, np.empty(len(group)))


@njit(cache=True, nogil=True)
def _stall_cols(counts, span, a, group, YT):  # pragma: no cover - compiled
    # `CompiledLink.stall` of the columns of YT [K, N]: one column as numpy sums one vector, more
    # in class order (`_stall_rows`).
    out = np.empty(YT.shape[1])
    if YT.shape[1] == 1:
        out[0] = _stall_one(counts, span, a, group, YT[:, 0].copy())
    elif YT.shape[1] > 1:
        _stall_rows(counts, span, a, group, YT, out)
    return out


@njit(cache=True, nogil=True)
def _loads(ks, load, K):  # pragma: no cover - compiled
    # np.bincount(ks, weights=load, minlength=K): summed in request order.
    Y = np.zeros(K)
    for r in range(len(ks)):
        Y[ks[r]] += load[r]
    return Y


@njit(cache=True, nogil=True)
def _used(e, dev, ks):  # pragma: no cover - compiled
    # e @ dev[ks]: device token-layers of a placement (integers, exact).
    used = 0
    for r in range(len(ks)):
        used += e[r] * dev[ks[r]]
    return used


@njit(cache=True, nogil=True)
def _first_each(order, rr, R):  # pragma: no cover - compiled
    # order[np.sort(np.unique(rr[order], return_index=True)[1])]: each request's first entry, in order.
    seen = np.zeros(R, dtype=np.bool_)
    mv = np.empty(len(order), dtype=np.int64)
    m = 0
    for t in order:
        if not seen[rr[t]]:
            seen[rr[t]] = True
            mv[m] = t
            m += 1
    return mv[:m]


@njit(cache=True, nogil=True)
def _prefix_loads(Y, ks, load, rr, kk, mv):  # pragma: no cover - compiled
    # Y + np.cumsum(step, 0).T with step[t] the move mv[t] (request rr, to class kk): [K, len(mv)],
    # each column Y plus the running sum of the moves so far (numpy's order: the cumulative sum
    # first, Y added last).
    K, m = len(Y), len(mv)
    cs, out = np.zeros(K), np.empty((K, m))
    for t in range(m):
        r, k = rr[mv[t]], kk[mv[t]]
        step = np.zeros(K)
        step[ks[r]] -= load[r]
        step[k] += load[r]
        for j in range(K):
            cs[j] = step[j] if t == 0 else cs[j] + step[j]
            out[j, t] = Y[j] + cs[j]
    return out


@njit(cache=True, nogil=True)
def _moved_cols(Y, ks, load, rr, kk):  # pragma: no cover - compiled
    # `fastpath._moved`, transposed: column t is Y with request rr[t] moved to class kk[t].
    out = np.empty((len(Y), len(rr)))
    for t in range(len(rr)):
        out[:, t] = Y
        out[ks[rr[t]], t] -= load[rr[t]]
        out[kk[t], t] += load[rr[t]]
    return out


@njit(cache=True, nogil=True)
def _greedy(counts, span, a, group, load, e, dev, cap, ks0, reach, slack_frac):  # pragma: no cover
    # `fastpath.offload_greedy` (its numpy version is tests/test_fastpath_jit.py's reference), the
    # same operations in the same order.
    ks, K, R = ks0.copy(), len(dev), len(ks0)
    by_dev = np.argsort(-dev, kind="mergesort")
    rank = np.empty(K, dtype=np.int64)
    for i in range(K):
        rank[by_dev[i]] = i
    while True:
        over = _used(e, dev, ks) - cap
        if over <= 0:
            return ks
        Y = _loads(ks, load, K)
        F = _stall_one(counts, span, a, group, Y)
        rr, kk = np.empty(R * reach, dtype=np.int64), np.empty(R * reach, dtype=np.int64)
        n = 0
        for r in range(R):  # the next `reach` classes with fewer device layers (ties skipped)
            c, j = 0, rank[ks[r]] + 1
            while j < K and c < reach:
                if dev[by_dev[j]] < dev[ks[r]]:
                    rr[n], kk[n] = r, by_dev[j]
                    n += 1
                    c += 1
                j += 1
        if n == 0:
            raise ValueError("offload_greedy: over capacity with no move left")
        rr, kk = rr[:n], kk[:n]
        freed = np.empty(n, dtype=np.int64)
        for t in range(n):
            freed[t] = e[rr[t]] * (dev[ks[rr[t]]] - dev[kk[t]])
        st = _stall_cols(counts, span, a, group, _moved_cols(Y, ks, load, rr, kk))
        score = np.empty(n)
        for t in range(n):
            score[t] = (st[t] - F) / min(freed[t], over)
        mv = _first_each(np.argsort(score, kind="mergesort"), rr, R)
        Fp = _stall_cols(counts, span, a, group, _prefix_loads(Y, ks, load, rr, kk, mv))
        m = len(mv)
        got, ratio = np.empty(m, dtype=np.int64), np.empty(m)
        acc = 0
        for t in range(m):
            acc += freed[mv[t]]
            got[t] = acc
            ratio[t] = (Fp[t] - F) / min(acc, over)
        lo = ratio.min()
        limit = lo + abs(lo) * slack_frac + 1e-12
        p, best, last = -1, np.inf, -1
        for t in range(m):
            if ratio[t] <= limit:
                last = t
                if got[t] >= over and Fp[t] < best:
                    p, best = t, Fp[t]
        if p < 0:
            p = last
        for t in range(p + 1):
            ks[rr[mv[t]]] = kk[mv[t]]


@njit(cache=True, nogil=True)
def _improve(counts, span, a, group, load, e, dev, cap, ks0, p_r, p_q, rounds):  # pragma: no cover
    # `fastpath.improve`'s rounds: steepest descent, each round `_improve_round`; a round with one
    # candidate rescored as numpy sums one vector; stops when the best does not descend.
    ks, K, L = ks0.copy(), len(dev), len(group) - 1
    for _ in range(rounds):
        Y = _loads(ks, load, K)
        need = np.empty(len(span))  # numpy's one-vector need: F, and the chain that bounds the round
        for i in range(len(span)):
            need[i] = _dot_one(counts[i], Y) - span[i]
        m, s, U = _chain(counts, span, a, group, need)
        F = U[L]
        n, n_moves, b, Fb, r, x = _round_on_chain(counts, span, a, group, Y, ks, load, e, dev,
                                                  cap - _used(e, dev, ks), p_r, p_q, m, s)
        if n == 0:
            break
        if n == 1:
            y = Y.copy()
            if n_moves:
                y[ks[r]] -= load[r]
                y[x] += load[r]
            else:
                y[ks[r]] += load[x] - load[r]
                y[ks[x]] += load[r] - load[x]
            Fb = _stall_one(counts, span, a, group, y)
        if Fb >= F - 1e-12 * (L + F):
            break
        if b < n_moves:
            ks[r] = x
        else:
            ks[r], ks[x] = ks[x], ks[r]
    return ks


@njit(cache=True, nogil=True)
def _reclaim_moves(counts, span, a, group, load, e, dev, cap, ks, stall_cap):  # pragma: no cover
    # `fastpath._reclaim_moves` (in place; False: no move applies).
    K, R, L = len(dev), len(ks), len(group) - 1
    host = L - dev
    Y = _loads(ks, load, K)
    slack = cap - _used(e, dev, ks)
    rr, kk = np.empty(R * K, dtype=np.int64), np.empty(R * K, dtype=np.int64)
    n = 0
    for r in range(R):
        for k in range(K):
            if host[k] < host[ks[r]] and e[r] * (dev[k] - dev[ks[r]]) <= slack:
                rr[n], kk[n] = r, k
                n += 1
    if n:
        st = _stall_cols(counts, span, a, group, _moved_cols(Y, ks, load, rr[:n], kk[:n]))
        m = 0
        for t in range(n):
            if st[t] <= stall_cap:
                rr[m], kk[m] = rr[t], kk[t]
                m += 1
        n = m
    if n == 0:
        return False
    rr, kk = rr[:n], kk[:n]
    key = np.empty(n)
    for t in range(n):
        key[t] = -load[rr[t]] * (host[ks[rr[t]]] - host[kk[t]])
    mv = _first_each(np.argsort(key, kind="mergesort"), rr, R)
    Fp = _stall_cols(counts, span, a, group, _prefix_loads(Y, ks, load, rr, kk, mv))
    take, acc = len(mv), 0
    for t in range(len(mv)):
        acc += e[rr[mv[t]]] * (dev[kk[mv[t]]] - dev[ks[rr[mv[t]]]])
        if not (Fp[t] <= stall_cap and acc <= slack):
            take = max(1, t)  # the first is feasible alone
            break
    for t in range(take):
        ks[rr[mv[t]]] = kk[mv[t]]
    return True


@njit(cache=True, nogil=True)
def _reclaim_swap(counts, span, a, group, load, e, dev, cap, ks, stall_cap, small, large):  # pragma: no cover
    # `fastpath._reclaim_swap` (in place; False: no swap applies).
    L = len(group) - 1
    host = L - dev
    slack = cap - _used(e, dev, ks)
    rs, qs, saved = np.empty(len(small), dtype=np.int64), np.empty(len(small), dtype=np.int64), np.empty(len(small))
    n = 0
    for t in range(len(small)):
        r, q = small[t], large[t]
        sv = (load[q] - load[r]) * (host[ks[q]] - host[ks[r]])
        if sv > 0 and (e[q] - e[r]) * (dev[ks[r]] - dev[ks[q]]) <= slack:
            rs[n], qs[n], saved[n] = r, q, sv
            n += 1
    if n == 0:
        return False
    Y = _loads(ks, load, len(dev))
    YT = np.empty((len(dev), n))
    for t in range(n):
        r, q = rs[t], qs[t]
        YT[:, t] = Y
        YT[ks[r], t] += load[q] - load[r]
        YT[ks[q], t] += load[r] - load[q]
    st = _stall_cols(counts, span, a, group, YT)
    b, best = -1, -np.inf
    for t in range(n):
        if st[t] <= stall_cap and (b < 0 or saved[t] > best):
            b, best = t, saved[t]
    if b < 0:
        return False
    ks[rs[b]], ks[qs[b]] = ks[qs[b]], ks[rs[b]]
    return True


@njit(cache=True, nogil=True)
def _reclaim(counts, span, a, group, load, e, dev, cap, ks0, stall_cap, small, large):  # pragma: no cover
    # `fastpath.reclaim`: single moves while any applies, else one swap, until neither does.
    ks = ks0.copy()
    while _reclaim_moves(counts, span, a, group, load, e, dev, cap, ks, stall_cap) \
            or _reclaim_swap(counts, span, a, group, load, e, dev, cap, ks, stall_cap, small, large):
        pass
    return ks


@njit(cache=True, nogil=True)
def edf_stall(need):  # pragma: no cover - compiled
    """`problem._stall_s`'s longest path: need [L, L] (need[a, b] for a <= b, seconds), the least
    total stall U[L] with U[b + 1] = max(U[b], max_a<=b U[a] + need[a, b]) (maxima are exact, so
    the value is the Python loop's bit for bit)."""
    L = need.shape[0]
    u = np.empty(L + 1)
    u[0] = 0.0
    for b in range(L):
        best = u[0] + need[0, b]
        for a in range(1, b + 1):
            v = u[a] + need[a, b]
            if v > best:
                best = v
        u[b + 1] = best if best > u[b] else u[b]
    return u[L]


@njit(cache=True, nogil=True)
def engine_step(loads, backs, limits, order, c, bw, tail):  # pragma: no cover - compiled
    """`problem.engine_step_time`'s layer loop: loads / backs [L] (bytes copied in / written back
    per host layer, 0 elsewhere), limits [L] (copies issued before each layer computes:
    `kv.prefetch.issue_limit`), order [H] (the host layers, ascending), c (seconds per layer
    outside the tail), bw (bytes/s), tail (seconds). The same operations in the same order as
    the Python loop it replaces, so the same step time bit for bit."""
    L = len(loads)
    ready = np.full(L, -np.inf)
    now = link = 0.0
    issued = 0
    for layer in range(L):
        while issued < limits[layer]:
            h = order[issued]
            link = max(link, now) + loads[h] / bw
            ready[h] = link
            issued += 1
        now = max(now, ready[layer]) + c
        if backs[layer] > 0:
            link = max(link, now) + backs[layer] / bw
    return now + tail


class CompiledLink:
    """The compiled side of one (layers, distances) link: counts [I, K], interval starts `a` [I]
    and spans [I], grouped by end layer (`group` [L + 1] offsets)."""

    def __init__(self, counts: np.ndarray, a: np.ndarray, span: np.ndarray, group: np.ndarray) -> None:
        self.counts = np.ascontiguousarray(counts, dtype=np.float64)
        self.a, self.group = np.ascontiguousarray(a, dtype=np.int64), np.ascontiguousarray(group, dtype=np.int64)
        self.span = np.ascontiguousarray(span, dtype=np.float64)
        self.L = len(group) - 1

    def stall(self, Y: np.ndarray) -> np.ndarray:
        """Least stall of each row of Y [N, K] (class loads), in compute layers: [N]."""
        if Y.shape[0] == 1:  # numpy's one-vector sum (module docstring)
            return np.array([self.path_stall(np.einsum("ik,kn->in", self.counts, np.ascontiguousarray(Y.T))[:, 0] - self.span)])
        out = np.empty(Y.shape[0])
        _stall_rows(self.counts, self.span, self.a, self.group, np.ascontiguousarray(Y.T, dtype=np.float64), out)
        return out

    def improve_round(self, Y, ks, load, e, dev, slack: int, p_r, p_q) -> tuple[int, int, int, float, int, int]:
        """`_improve_round` on this link: Y [K] class loads, ks [R] classes, load [R], e [R] end
        tokens, dev [K] device layers, p_r / p_q [S] swap partners (the dtypes it was compiled for)."""
        f, i = np.float64, np.int64
        return _improve_round(self.counts, self.span, self.a, self.group, np.asarray(Y, f), np.asarray(ks, i),
                              frozen(load, f), frozen(e, i), frozen(dev, i), int(slack),
                              np.asarray(p_r, i), np.asarray(p_q, i))

    def greedy(self, load, e, dev, cap: int, ks, reach: int, slack_frac: float) -> np.ndarray:
        """`fastpath.offload_greedy` compiled: load [R] float64, e [R] / dev [K] / ks [R] int64."""
        return _greedy(self.counts, self.span, self.a, self.group, *_typed(load, e, dev, cap, ks),
                       int(reach), float(slack_frac))

    def improve(self, load, e, dev, cap: int, ks, p_r, p_q, rounds: int) -> np.ndarray:
        """`fastpath.improve` compiled (p_r / p_q [S]: swap partners)."""
        i = np.int64
        return _improve(self.counts, self.span, self.a, self.group, *_typed(load, e, dev, cap, ks),
                        np.asarray(p_r, i), np.asarray(p_q, i), int(rounds))

    def reclaim(self, load, e, dev, cap: int, ks, stall_cap: float, small, large) -> np.ndarray:
        """`fastpath.reclaim` compiled (small / large [S]: swap partners)."""
        i = np.int64
        return _reclaim(self.counts, self.span, self.a, self.group, *_typed(load, e, dev, cap, ks),
                        float(stall_cap), np.asarray(small, i), np.asarray(large, i))

    def path_stall(self, need: np.ndarray) -> float:
        """U[L] for a per-interval need [I] (transfers minus compute, in compute layers)."""
        return float(_path(np.ascontiguousarray(need, dtype=np.float64), self.a, self.group,
                           np.empty(self.L + 1)))

    def chain(self, need: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """(m_C [K], s_C, U [L + 1]) of the critical chain for a per-interval need [I]."""
        m, s, U = _chain(self.counts, self.span, self.a, self.group, np.ascontiguousarray(need, dtype=np.float64))
        return m, float(s), U


def frozen(arr, dtype) -> np.ndarray:
    """`arr` as `dtype`, read-only (a view when it is writable; no copy when the dtype already is).
    The kernels are compiled for read-only inputs only, the fast path's cached per-window arrays
    being read-only: one signature per kernel instead of two halves the first import's compile."""
    out = np.asarray(arr, dtype)
    if out.flags.writeable:
        out = out.view()
        out.flags.writeable = False
    return out


def _typed(load, e, dev, cap, ks) -> tuple:
    """The dtypes (and read-only inputs) the fast path's loops were compiled for."""
    f, i = np.float64, np.int64
    return frozen(load, f), frozen(e, i), frozen(dev, i), int(cap), np.asarray(ks, i)


def _warm_up() -> None:
    """Compile (or load from the cache) every signature a solve uses; the wrappers hand the kernels
    their loads (and branch and bound and the local search their end tokens and device layers)
    read-only (`frozen`), as the fast path's per-window cache holds them."""
    f, i = np.float64, np.int64
    counts = np.array([[1.0, 0.0], [1.0, 2.0]])
    link = CompiledLink(counts, np.array([0, 0]), np.array([0.0, 1.0]), np.array([0, 1, 2]))
    link.stall(np.ones((2, 2)))
    link.stall(np.ones((1, 2)))
    link.chain(np.ones(2))
    hull = frozen([0, 1], i)  # the fast path's hulls are cached, read-only
    load = frozen([1.0, 2.0], f)
    knapsack(load, np.array([1.0, 2.0]), np.array([2.0, 1.0]), 1.0, np.array([1.0, 2.0]), hull, 3.0, 3.0)
    ks, e, dev = np.array([0, 1]), np.array([1, 1]), np.array([1, 0])
    link.improve_round(np.ones(2), ks, np.ones(2), e, dev, 1, np.array([0]), np.array([1]))
    link.greedy(np.ones(2), e, dev, 1, ks, 3, 0.25)
    link.improve(np.ones(2), e, dev, 1, ks, np.array([0]), np.array([1]), 2)
    link.reclaim(np.ones(2), e, dev, 1, ks, 1.0, np.array([0]), np.array([1]))
    edf_stall(np.zeros((2, 2)))
    knapsacks(load, np.array([1.0, 2.0]), np.array([2.0, 1.0]), 1.0,
              np.array([[1.0, 2.0]]), np.array([[0, 1]]), np.array([2]), 3.0, 3.0)
    lower_bound_chains(counts, np.array([0.0, 1.0]), np.array([0, 0]), np.array([0, 1, 2]), load,
                       np.array([1.0, 2.0]), np.array([2.0, 1.0]), 1.0, np.array([1.0, 2.0]), 1.0, 8, 3.0, 3.0)
    order = frozen([[0, 1], [1, 0]], i)
    branch_and_bound(counts, np.array([0.0, 1.0]), np.array([0, 0]), np.array([0, 1, 2]), load, frozen([1, 1], i),
                     frozen([2, 0], i), 1, np.array([[1.0, 2.0]]), np.array([1.0]), np.array([0, 0]), 0.01, 4, order,
                     2)
    limits = frozen([1, 1], i)  # `problem._issue_limits` are cached, read-only
    engine_step(np.array([0, 4]), np.array([0, 1]), limits, np.array([1]), 1.0, 2.0, 0.0)


_warm_up()
