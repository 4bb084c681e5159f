"""The central planner's primal heuristic: plans near the LP bound of the compact ILP, without a MIP.

Why it works (measured on bench/planner.py's instances, `ilp_compact.py`'s module docstring): the
stall depends on a placement only through its class loads Y = load @ x, and the LP relaxation's
dual weighting of the link rows is, on these batches, almost exactly the whole step's host-layer
count per class (m_k ~ L - dev_k; times 1 + copy_ratio where copies cost compute,
`fastpath.LinkEval`). On that row m . Y = L * sum(load) - sum_r load_r dev[k_r] (scaled alike), and
since every request's end tokens are nearly proportional to its load (e_r / load_r varies by well
under 1 % in a batch), the knapsack under the capacity row is flat across the classes: a huge face
of placements ties with the LP bound, among them ones that put most of the batch all on device or
all on host with a few requests in between (the LP's own solution does). The fast path's plan lies
in another basin (many requests at short distances, where other link chains bind), 8e-4 to 3e-3
above the bound, and single moves or swaps from it do not reach the face. From a placement on the
face, what is left is a subset sum: fill the capacity row to within a few hundred token-layers
while no chain other than the LP row's binds, which a descent over one- and two-request moves does.

So the heuristic (`TargetSearch.search`): starts on the LP's face (the knapsack's integral rounding
over the LP row, `fastpath.knapsack_bound`, and the LP solution's largest class per request, made
to fit by `fastpath.offload_greedy`), then the fast path's plan; from each a steepest descent
(`_descend`, compiled): every move of one request to another class and every pair of such moves
that fits the capacity row exactly (integers), screened by a lower bound on the stall (the best of
a set of chains, each a valid bound on any placement: the LP row, the fast path's chains and the
critical chain of every plan visited), the least bounds scored exactly (the longest path over the
critical intervals, `linkjit`'s arithmetic) until the next bound is no better than the best score
found. It stops at the first plan within the target (rel_gap of the caller's lower bound), after
`rounds` descents per start, or when no move improves. A count of rounds and exactly scored
candidates bounds the work: no clock, so the same inputs give the same plan on any load.

The heuristic only proposes: the caller scores its plan exactly (`problem.step_time`, `fits`) and
proves nothing from it; a proof is the plan's T within rel_gap of a lower bound (`ilp_compact`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from orbitflow_ray.planner.fastpath import Chain, LinkEval, knapsack_bound, offload_greedy
from orbitflow_ray.planner.linkjit import _chain, _loads, _stall_one, _used


@njit(cache=True, nogil=True)
def _sift_down(key, idx, n, at):  # pragma: no cover - compiled
    # max-heap on key[:n] (idx rides along)
    while True:
        left, top = 2 * at + 1, at
        if left < n and key[left] > key[top]:
            top = left
        if left + 1 < n and key[left + 1] > key[top]:
            top = left + 1
        if top == at:
            return
        key[at], key[top] = key[top], key[at]
        idx[at], idx[top] = idx[top], idx[at]
        at = top


@njit(cache=True, nogil=True)
def _offer(key, idx, n, cap_n, value, code):  # pragma: no cover - compiled
    # keep the cap_n least keys: returns the new heap size
    if n < cap_n:
        key[n], idx[n] = value, code
        at = n
        while at > 0:
            up = (at - 1) // 2
            if key[up] >= key[at]:
                break
            key[at], key[up] = key[up], key[at]
            idx[at], idx[up] = idx[up], idx[at]
            at = up
        return n + 1
    if value < key[0]:
        key[0], idx[0] = value, code
        _sift_down(key, idx, n, 0)
    return n


@njit(cache=True, nogil=True)
def _descend(counts, span, a, group, load, e, dev, cap, ks0, M0, S0, target, rounds, max_exact
             ):  # pragma: no cover - compiled
    # Steepest descent over one- and two-request moves (module docstring). Returns (ks, stall,
    # exactly scored candidates, rounds run, chains M [C, K], S [C] seen).
    R, K = len(load), len(dev)
    ks = ks0.copy()
    Y = _loads(ks, load, K)
    used = _used(e, dev, ks)
    cur = _stall_one(counts, span, a, group, Y)
    C0 = M0.shape[0]
    M, S = np.zeros((C0 + rounds + 1, K)), np.zeros(C0 + rounds + 1)
    M[:C0], S[:C0] = M0, S0
    m, s, _ = _chain(counts, span, a, group, counts @ Y - span)
    M[C0], S[C0] = m, s
    nc, scored, rd = C0 + 1, 0, 0
    key, idx = np.empty(max_exact), np.empty(max_exact, dtype=np.int64)
    d_lb = np.empty((R, K, C0 + rounds + 1))
    d_cap = np.empty((R, K), dtype=np.int64)
    base = np.empty(C0 + rounds + 1)
    y2 = np.empty(K)
    RK = R * K
    while rd < rounds and cur > target:
        rd += 1
        for c in range(nc):
            base[c] = M[c] @ Y - S[c]
        for r in range(R):
            for k in range(K):
                d_cap[r, k] = e[r] * (dev[k] - dev[ks[r]])
                for c in range(nc):
                    d_lb[r, k, c] = (M[c, k] - M[c, ks[r]]) * load[r]
        n = 0
        slack = cap - used
        for i in range(R):
            for k1 in range(K):
                if k1 == ks[i]:
                    continue
                c1 = d_cap[i, k1]
                if c1 <= slack:  # one request moves
                    lb = -np.inf
                    for c in range(nc):
                        v = base[c] + d_lb[i, k1, c]
                        if v > lb:
                            lb = v
                    if lb < cur:
                        n = _offer(key, idx, n, max_exact, lb, (i * K + k1) * RK + RK - 1)
                for j in range(i + 1, R):
                    for k2 in range(K):
                        if k2 == ks[j] or c1 + d_cap[j, k2] > slack:
                            continue
                        lb = -np.inf
                        for c in range(nc):
                            v = base[c] + d_lb[i, k1, c] + d_lb[j, k2, c]
                            if v > lb:
                                lb = v
                        if lb < cur and (n < max_exact or lb < key[0]):
                            n = _offer(key, idx, n, max_exact, lb, (i * K + k1) * RK + j * K + k2)
        if n == 0:
            break
        order = np.argsort(key[:n])
        best, best_code = cur, -1
        for q in order:
            if key[q] >= best:
                break
            code = idx[q]
            first, second = code // RK, code % RK
            i, k1 = first // K, first % K
            y2[:] = Y
            y2[ks[i]] -= load[i]
            y2[k1] += load[i]
            if second != RK - 1:
                j, k2 = second // K, second % K
                y2[ks[j]] -= load[j]
                y2[k2] += load[j]
            v = _stall_one(counts, span, a, group, y2)
            scored += 1
            if v < best:
                best, best_code = v, code
        if best_code < 0:
            break
        first, second = best_code // RK, best_code % RK
        i, k1 = first // K, first % K
        used += d_cap[i, k1]
        ks[i] = k1
        if second != RK - 1:
            j, k2 = second // K, second % K
            used += d_cap[j, k2]
            ks[j] = k2
        Y = _loads(ks, load, K)
        cur = _stall_one(counts, span, a, group, Y)
        m, s, _ = _chain(counts, span, a, group, counts @ Y - span)
        M[nc], S[nc] = m, s
        nc += 1
    return ks, cur, scored, rd, M[:nc].copy(), S[:nc].copy()


class TargetSearch:
    """Primal heuristic of the central planner (module docstring). `rounds`: descent rounds per
    start; `max_exact`: candidates scored exactly per round (the least lower bounds first).
    `stats`: starts run, rounds, candidates scored exactly, and which start gave the plan."""

    def __init__(self, rounds: int = 12, max_exact: int = 64) -> None:
        if rounds < 1 or max_exact < 1:
            raise ValueError(f"need rounds >= 1 and max_exact >= 1, got {rounds}, {max_exact}")
        self.rounds, self.max_exact = rounds, max_exact
        self.stats = dict.fromkeys(("searches", "starts", "rounds", "scored", "from_knapsack", "from_lp",
                                    "from_fast", "reached_target"), 0)

    def search(self, link: LinkEval, load, e, dev, cap: int, fast: np.ndarray, chains: list[Chain],
               lp_row: Chain | None, lp_x: np.ndarray | None, target: float) -> tuple[np.ndarray, float]:
        """(placement, its stall in compute layers): the least stall found from the starts, never
        above `fast`'s (a placement that fits). `chains`: valid lower-bound rows (m [K], s) to
        screen moves with (the LP row among them); `lp_row`, `lp_x`: the LP relaxation's weighting
        row and solution [R, K], for the starts (None: not that start); `target`: stop at a stall
        this low.
        load [R] float, e [R] / dev [K] int, cap int (token-layers), as `FastPlanner._arrays`."""
        K = len(dev)
        # writable copies: the kernel is compiled (at import, `_warm_up`) for one signature
        ef, devf = np.array(e, np.float64), np.array(dev, np.float64)
        e64, dev64 = np.array(e, np.int64), np.array(dev, np.int64)
        load = np.array(load, np.float64)
        rows = list(chains) if chains else [(np.zeros(K), 0.0)]
        M0 = np.array([np.asarray(m, np.float64) for m, _ in rows]).reshape(len(rows), K)
        S0 = np.array([float(s) for _, s in rows], dtype=np.float64)
        starts: list[tuple[str, np.ndarray]] = []
        if lp_row is not None:
            starts.append(("from_knapsack", np.array(knapsack_bound(load, ef, devf, float(cap), lp_row[0])[1],
                                                       np.int64)))
        if lp_x is not None:
            ks = np.argmax(lp_x, axis=1).astype(np.int64)
            if int(devf[ks] @ ef) > cap:
                ks = offload_greedy(link, load, e64, dev64, cap, ks)
            starts.append(("from_lp", np.array(ks, np.int64)))
        starts.append(("from_fast", np.array(fast, np.int64)))
        self.stats["searches"] += 1
        j = link.jit
        best = np.asarray(fast, np.int64)
        best_stall, best_name = float(link.stall(np.bincount(best, weights=load, minlength=K)[None])[0]), "from_fast"
        for name, ks0 in starts:
            if int(dev64[ks0] @ e64) > cap:
                continue
            self.stats["starts"] += 1
            ks, stall, scored, rd, M, S = _descend(j.counts, j.span, j.a, j.group, load, e64, dev64, int(cap), ks0,
                                                   M0, S0, float(target), self.rounds, self.max_exact)
            self.stats["rounds"] += int(rd)
            self.stats["scored"] += int(scored)
            M0, S0 = M, S  # the chains met carry over to the next start
            if stall < best_stall:
                best, best_stall, best_name = ks, float(stall), name
            if best_stall <= target:
                self.stats["reached_target"] += 1
                break
        self.stats[best_name] += 1
        return best, best_stall


def _warm_up() -> None:
    """Compile (or load from the on-disk cache) `_descend` for the one signature `search` uses,
    when this module is imported: never inside a solve (as `linkjit`)."""
    f, i = np.float64, np.int64
    counts = np.array([[1.0, 0.0], [1.0, 2.0]])
    _descend(counts, np.array([0.0, 1.0]), np.array([0, 0], i), np.array([0, 1, 2], i), np.array([1.0, 2.0]),
             np.array([1, 1], i), np.array([1, 0], i), 1, np.array([0, 1], i), np.zeros((1, 2), f), np.zeros(1, f),
             0.0, 2, 4)


_warm_up()
