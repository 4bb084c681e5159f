"""The fast path's hot loops, compiled (Numba): `fastpath` calls these.

The link stall of a class-load vector is a longest path over the critical intervals
(`problem.critical_intervals`); the fast path evaluates it for thousands of candidate placements
per solve. Here: the stall of a batch of vectors (`_stall_rows`, SIMD across the vectors), the
critical chain of one (`_chain`), a whole round of `improve` (`_improve_round`: its candidates
built and scored in one call) and the knapsack bound past its hull (`knapsack`).

Same numbers as the numpy code they replace, so the same plans: `need` sums count_k * Y_k over k in
class order from zero (what numpy's einsum does for two or more vectors; terms with a zero count
add exactly zero, so they are skipped), the longest path takes the same maxima, and cumulative sums
and the stable sort run in numpy's order. One vector alone numpy sums with SIMD multiply-adds
(machine-dependent rounding): the caller computes that `need` with numpy and passes it in
(`path_stall`, `chain`). `_improve_round` returns the first least stall, as numpy's argmin: it
scores the candidates in order of a lower bound (the current plan's critical chain evaluated at
each candidate: a path, so never above its stall) and stops once the next bound is over the least
found, by a margin far above rounding. tests/test_fastpath_jit.py checks each against numpy.

Compiled single-threaded (`nogil`, no `parallel`: the decode thread must not start a pool), cached
on disk beside this file where that is writable, and warmed up when this module is imported for
every signature a solve uses, so a solve never compiles: the first import compiles (about 10 s of
CPU), later ones load the cache (numba's import and the load add about 0.3 s to the planner's).
"""

from __future__ import annotations

import os
import sys

import numpy as np

# As kernels/orbitflow_kernels/numba_kernel.py: Numba sizes its thread pool from NUMBA_NUM_THREADS
# when first imported. If the planner imports it first, size it as that kernel would (torch's
# intra-op threads, when torch is loaded) and unset it again for processes started later.
_ours = "NUMBA_NUM_THREADS" not in os.environ and "torch" in sys.modules
if _ours:
    os.environ["NUMBA_NUM_THREADS"] = str(sys.modules["torch"].get_num_threads())
try:
    from numba import njit  # noqa: E402
finally:
    if _ours:
        del os.environ["NUMBA_NUM_THREADS"]


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


@njit(cache=True, nogil=True)
def _stall_rows(counts, span, a, group, YT, out):  # pragma: no cover - compiled
    # counts [I, K]; YT [K, N] (class loads, one column per vector); out [N]: each column's stall.
    # The vectors run in the innermost loops (SIMD across vectors, each sum still in class order).
    n_int, n_cls = counts.shape
    L = len(group) - 1
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
    # token-layers), in its order (moves by request then class, then the swaps), scored at once.
    # Returns (candidates, of them moves, best index (the first least), its stall, its request, and
    # its class (a move) or partner (a swap)).
    R, K = len(ks), len(Y)
    n_sw = len(p_r)
    YT = np.empty((K, R * (K - 1) + n_sw))
    who = np.empty((len(YT[0]), 2), dtype=np.int64)
    n = 0
    for r in range(R):
        for k in range(K):
            if k != ks[r] and e[r] * (dev[k] - dev[ks[r]]) <= slack:
                YT[:, n] = Y
                YT[ks[r], n] -= load[r]
                YT[k, n] += load[r]
                who[n, 0], who[n, 1] = r, k
                n += 1
    n_mv = n
    for t in range(n_sw):
        r, q = p_r[t], p_q[t]
        if ks[r] != ks[q] and (e[r] - e[q]) * (dev[ks[q]] - dev[ks[r]]) <= slack:
            YT[:, n] = Y
            YT[ks[r], n] += load[q] - load[r]
            YT[ks[q], n] += load[r] - load[q]
            who[n, 0], who[n, 1] = r, q
            n += 1
    if n == 0:
        return 0, 0, -1, 0.0, -1, -1
    b, best = _least(counts, span, a, group, Y, YT[:, :n])
    return n, n_mv, b, best, who[b, 0], who[b, 1]


SCORE_CHUNK = 32  # candidates scored per pass in `_least`


@njit(cache=True, nogil=True)
def _least(counts, span, a, group, Y, YT):  # pragma: no cover - compiled
    # (first index of the least stall, that stall) over the columns of YT, scoring as few as it
    # can: the critical chain of Y (intervals m_C, compute s_C) bounds each column's stall from
    # below (stall >= m_C . y - s_C, a path), columns are scored in order of that bound, and the
    # search stops when the next bound is over the least found (with a margin far above rounding).
    n_int, K, n = len(span), len(Y), YT.shape[1]
    need = np.empty(n_int)
    for i in range(n_int):
        acc = 0.0
        for k in range(K):
            acc += counts[i, k] * Y[k]
        need[i] = acc - span[i]
    m, s, _ = _chain(counts, span, a, group, need)
    lb = np.empty(n)
    for c in range(n):
        acc = 0.0
        for k in range(K):
            acc += m[k] * YT[k, c]
        lb[c] = acc - s
    order = np.argsort(lb, kind="mergesort")
    buf, out = np.empty((K, SCORE_CHUNK)), np.empty(SCORE_CHUNK)
    b, best = -1, np.inf
    for lo in range(0, n, SCORE_CHUNK):
        if lb[order[lo]] - 1e-9 * (1.0 + abs(lb[order[lo]]) + s) > best:
            break
        w = min(SCORE_CHUNK, n - lo)
        for t in range(w):
            buf[:, t] = YT[:, order[lo + t]]
        _stall_rows(counts, span, a, group, buf[:, :w], out)
        for t in range(w):
            c = order[lo + t]
            if out[t] < best or (out[t] == best and c < b):
                b, best = c, out[t]
    return b, best


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
                              np.asarray(load, f), np.asarray(e, i), np.asarray(dev, i), int(slack),
                              np.asarray(p_r, i), np.asarray(p_q, i))

    def path_stall(self, need: np.ndarray) -> float:
        """U[L] for a per-interval need [I] (transfers minus compute, in compute layers)."""
        return float(_path(np.ascontiguousarray(need, dtype=np.float64), self.a, self.group,
                           np.empty(self.L + 1)))

    def chain(self, need: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """(m_C [K], s_C, U [L + 1]) of the critical chain for a per-interval need [I]."""
        m, s, U = _chain(self.counts, self.span, self.a, self.group, np.ascontiguousarray(need, dtype=np.float64))
        return m, float(s), U


def _warm_up() -> None:
    """Compile (or load from the cache) every signature a solve uses."""
    counts = np.array([[1.0, 0.0], [1.0, 2.0]])
    link = CompiledLink(counts, np.array([0, 0]), np.array([0.0, 1.0]), np.array([0, 1, 2]))
    link.stall(np.ones((2, 2)))
    link.stall(np.ones((1, 2)))
    link.chain(np.ones(2))
    hull = np.array([0, 1])
    hull.flags.writeable = False  # the fast path's hulls are cached, read-only
    for frozen in (False, True):  # its loads are read-only when they come from its per-window cache
        load = np.array([1.0, 2.0])
        load.flags.writeable = not frozen
        knapsack(load, np.array([1.0, 2.0]), np.array([2.0, 1.0]), 1.0, np.array([1.0, 2.0]), hull, 3.0, 3.0)
    ks = np.array([0, 1])
    for frozen in (False, True):  # the fast path's per-window arrays are read-only
        load, e, dev = np.ones(2), np.array([1, 1]), np.array([1, 0])
        for arr in (load, e, dev):
            arr.flags.writeable = not frozen
        link.improve_round(np.ones(2), ks, load, e, dev, 1, np.array([0]), np.array([1]))


_warm_up()
