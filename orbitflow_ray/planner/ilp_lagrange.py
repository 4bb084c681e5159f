"""The central planner's Lagrangian bound: stronger than the LP relaxation where the integrality gap
comes from the capacity row, and the placements it meets as a primal heuristic.

Every chain c of link intervals (m_c [K], s_c) gives a valid lower bound on the stall of any
placement: stall(Y) >= m_c . Y - s_c (a longest path is at least any chain; `fastpath`). For
weights lambda >= 0 with sum 1 over a chain set, stall(Y) >= sum_c lambda_c (m_c . Y - s_c), so

    g(lambda) = min over integral placements x that fit the capacity row of
                w . Y(x) - lambda . s,   w = sum_c lambda_c m_c

is a lower bound on the least stall. The inner problem is a multiple-choice knapsack (request r
picks a class k at cost load_r * w_k and device token-layers e_r * dev_k, one capacity row), kept
integral. Its LP relaxation is the sort of `fastpath.knapsack_bound`; at the compact model's LP
weighting that equals the LP bound (`ilp_compact`). Max over lambda of g convexifies only the max
over chains, so it exceeds the LP bound by what the capacity row's integrality costs (it cannot
close a gap from mixing placements: then the chain MIP's branching must).

The knapsack (`mckp`, compiled), exact by a search around its LP relaxation. The LP (the sort of
`fastpath.knapsack_bound`) prices a device token-layer at pi (the cost per token-layer of its
fractional step); at that price every placement x satisfies the identity
value(x) = LR + sum_r rc[r, k_r] + pi * (cap - used(x)), with LR = sum_r min_k (load_r w_k +
pi e_r dev_k) - pi cap (the Lagrangian of the capacity row, valid for any pi >= 0) and reduced
costs rc >= 0. So a placement beating the incumbent (the LP's rounding with its slack spent
greedily, or the caller's placement, whichever is cheaper) has sum_r rc < incumbent - LR: a depth-
first search over requests' undominated classes in increasing reduced cost enumerates exactly
those, pruning on that sum, on the capacity row (the least device each remaining request can
take) and on the slack term (the most it can take). Exhausted, the incumbent is the optimum;
stopped by the node budget (a count, no clock), the bound is LR. Arithmetic: device token-layers
in int64 (exact); costs are float64 sums of at most R products, pruning keeps a 1e-11 relative
margin and the bound is the incumbent less it; the caller takes 1e-9 (relative and absolute) off
every value it proves with. (Best-first branch and bound on the LP bound, tried first, did not
raise the bound in 256 nodes: the classes' costs per device token-layer differ by under 1 % across
a batch, so the LP bound is flat and only a search bounded by the incumbent gets anywhere.)

The weights (`LagrangianBound.search`): first lambda = 1 on the first chain given (the LP's
weighting), then a cutting-plane master over the placements met, in cvxpy (HiGHS; DPP, one fixed
size, compiled when the bound is built), min t s.t. t >= m_c . (sum_j mu_j Y_j) - s_c, mu in the
simplex; its chain rows' duals are the next lambda. The master only proposes lambda;
what proves is g(lambda), computed by `mckp` in the arithmetic above. The chains grow lazily: the
critical chain of each inner solution and of the master's mixed loads. Every inner solution is a
placement: the caller scores it exactly and may descend from it (`ilp_targets`). A count of rounds
bounds the work, so the same inputs give the same bound and plans on any load.
"""

from __future__ import annotations

import warnings
from typing import Callable

import cvxpy as cp
import cvxpy.settings as cps
from cvxpy.reductions.solvers.conic_solvers.highs_conif import dims_to_solver_dict
from cvxpy.settings import PARAM_PROB
import numpy as np
from numba import njit

from orbitflow_ray.planner.fastpath import Chain, LinkEval, _hull

PROOF_RTOL = 1e-9  # taken off (relative and absolute) every knapsack value used as a bound


@njit(cache=True, nogil=True)
def _root(load, e, dev, cap, w, hull, order, H):  # pragma: no cover - compiled
    # The knapsack's LP relaxation by the sort: (the price pi of a device token-layer at its
    # fractional step (0 if all fit at the least cost), the rounded placement (the fractional
    # request at its next hull point: it fits), its value); value inf if no placement fits.
    R = len(load)
    ks = np.empty(R, dtype=np.int64)
    cost, weight = 0.0, 0
    for r in range(R):
        ks[r] = hull[0]
        cost += load[r] * w[hull[0]]
        weight += e[r] * dev[hull[0]]
    if weight <= cap:
        return 0.0, ks, cost
    saved = 0
    for t in range(len(order)):
        r, h = order[t] // H, order[t] % H
        s = e[r] * (dev[hull[h]] - dev[hull[h + 1]])
        dw = w[hull[h + 1]] - w[hull[h]]
        ks[r] = hull[h + 1]
        cost += load[r] * dw
        saved += s
        if saved >= weight - cap:
            return dw * load[r] / s, ks, cost
    return 0.0, ks, np.inf


@njit(cache=True, nogil=True)
def _fill(load, e, dev, cap, w, classes, ks):  # pragma: no cover - compiled
    # Spend the rounding's slack: move the request that saves the most cost into a class that
    # still fits, until none does (ks in place). Returns its value.
    used = 0
    for r in range(len(ks)):
        used += e[r] * dev[ks[r]]
    while True:
        gain, at, to = 0.0, -1, -1
        for r in range(len(ks)):
            for k in classes:
                if used + e[r] * (dev[k] - dev[ks[r]]) <= cap:
                    g = load[r] * (w[ks[r]] - w[k])
                    if g > gain:
                        gain, at, to = g, r, k
        if at < 0:
            break
        used += e[at] * (dev[to] - dev[ks[at]])
        ks[at] = to
    value = 0.0
    for r in range(len(ks)):
        value += load[r] * w[ks[r]]
    return value


@njit(cache=True, nogil=True)
def _mckp(load, e, dev, cap, w, hull, order, H, classes, max_nodes, start):  # pragma: no cover - compiled
    # Exact search around the LP (module docstring): (lower bound, best placement, its value,
    # nodes, exhausted).
    R, C = len(load), len(classes)
    pi, best, inc = _root(load, e, dev, cap, w, hull, order, H)
    if inc == np.inf:
        return np.inf, best, np.inf, 0, True
    inc = _fill(load, e, dev, cap, w, classes, best)
    if len(start):  # the caller's placement (it fits), when better
        v = _fill(load, e, dev, cap, w, classes, start)
        if v < inc:
            inc, best = v, start
    # reduced costs at price pi: value(x) = LR + sum_r rc[r, k_r] + pi * (cap - used(x))
    rc, lr = np.empty((R, C)), -pi * cap
    for r in range(R):
        lo = np.inf
        for j in range(C):
            rc[r, j] = load[r] * w[classes[j]] + pi * (e[r] * dev[classes[j]])
            lo = min(lo, rc[r, j])
        for j in range(C):
            rc[r, j] -= lo
        lr += lo
    tol = 1e-11 * (abs(lr) + abs(inc) + 1.0)
    cand = np.empty((R, C), dtype=np.int64)
    n_cand = np.empty(R, dtype=np.int64)
    for r in range(R):  # the classes that could beat the incumbent, by reduced cost
        idx = np.argsort(rc[r], kind="mergesort")
        n = 0
        for j in idx:
            if rc[r, j] <= inc - lr + tol:
                cand[r, n], n = j, n + 1
        n_cand[r] = n
    # requests with fewest candidates first, then the heaviest
    keyr = np.empty(R)
    for r in range(R):
        keyr[r] = n_cand[r] * 1e18 - e[r]
    rorder = np.argsort(keyr, kind="mergesort")
    min_suf, max_suf = np.zeros(R + 1, dtype=np.int64), np.zeros(R + 1, dtype=np.int64)
    for d in range(R - 1, -1, -1):
        r = rorder[d]
        lo, hi = np.int64(-1), np.int64(0)
        for j in range(n_cand[r]):
            wt = e[r] * dev[classes[cand[r, j]]]
            if lo < 0 or wt < lo:
                lo = wt
            hi = max(hi, wt)
        min_suf[d], max_suf[d] = min_suf[d + 1] + max(lo, 0), max_suf[d + 1] + hi
    pos = np.full(R, -1, dtype=np.int64)
    used, rcs, cost = np.zeros(R + 1, dtype=np.int64), np.zeros(R + 1), np.zeros(R + 1)
    ks = best.copy()
    d, nodes = 0, 0
    while d >= 0:
        r = rorder[d]
        pos[d] += 1
        j = pos[d]
        if j >= n_cand[r]:
            d -= 1
            continue
        c = cand[r, j]
        rs = rcs[d] + rc[r, c]
        if rs > inc - lr + tol:  # candidates come in increasing reduced cost
            d -= 1
            continue
        nodes += 1
        if nodes > max_nodes:
            return lr, best, inc, nodes, False
        u = used[d] + e[r] * dev[classes[c]]
        if u + min_suf[d + 1] > cap:
            continue
        if lr + rs + pi * max(0, cap - u - max_suf[d + 1]) > inc + tol:
            continue
        ks[r] = classes[c]
        v = cost[d] + load[r] * w[classes[c]]
        if d == R - 1:
            if v < inc:
                inc, best = v, ks.copy()
            continue
        used[d + 1], rcs[d + 1], cost[d + 1] = u, rs, v
        d += 1
        pos[d] = -1
    return inc - tol, best, inc, nodes, True


@njit(cache=True, nogil=True)
def _hull_order(load, e, dev, w, hull):  # pragma: no cover - compiled
    # every (request, hull step) in increasing cost per device token-layer saved (stable)
    R, H = len(load), len(hull) - 1
    keys = np.empty(R * H)
    for r in range(R):
        for h in range(H):
            keys[r * H + h] = (w[hull[h + 1]] - w[hull[h]]) / (dev[hull[h]] - dev[hull[h + 1]]) * (load[r] / e[r])
    return np.argsort(keys, kind="mergesort")


def undominated(dev, w) -> np.ndarray:
    """Classes no other class beats on both device layers and cost (ties: the first kept); an
    integral optimum uses only these (a dominated class's request moves to its dominator)."""
    dev, w = np.asarray(dev), np.asarray(w)
    keep = [k for k in range(len(dev))
            if not any((dev[j] <= dev[k] and w[j] <= w[k]) and (dev[j] < dev[k] or w[j] < w[k] or j < k)
                       for j in range(len(dev)) if j != k)]
    return np.array(keep, dtype=np.int64)


def mckp(load, e, dev, cap: int, w, max_nodes: int = 1_000_000, start: np.ndarray | None = None
         ) -> tuple[float, np.ndarray, float, int, bool]:
    """min sum_r load_r * w[k_r] over integral placements with sum_r e_r * dev[k_r] <= cap:
    (a lower bound on it, the best placement found, that placement's value, search nodes, exact).
    load [R] and w [K] float >= 0, e [R] / dev [K] / cap integers (token-layers). The bound is valid for any
    `max_nodes` (search nodes, a count); `exact` when the search was exhausted. `start`: a
    placement that fits, the first incumbent when better than the LP's rounding.
    Raises ValueError if no placement fits (not even every request at its fewest device layers)."""
    # writable, contiguous copies: the kernels are compiled (at import, `_warm_up`) for one signature
    w, devf = np.array(w, np.float64), np.array(dev, np.float64)
    hull = np.array(_hull(devf.tobytes(), w.tobytes()), np.int64)
    load, e64, dev64 = np.array(load, np.float64), np.array(e, np.int64), np.array(dev, np.int64)
    order = _hull_order(load, e64.astype(np.float64), devf, w, hull)
    lower, ks, value, nodes, exact = _mckp(load, e64, dev64, int(cap), w, hull, order, len(hull) - 1,
                                       undominated(dev64, w), int(max_nodes),
                                       np.zeros(0, np.int64) if start is None else np.array(start, np.int64))
    if lower == np.inf:
        raise ValueError("no placement fits the capacity row")
    return float(lower), ks, float(value), int(nodes), bool(exact)


class _Master:
    """The cutting-plane master of `LagrangianBound` for one number of classes K, in cvxpy (DPP):
    min t s.t. t >= A[c] . mu - s[c] (A[c, j] = m_c . Y_j, rows of unused chains zero), mu >= 0,
    sum mu = 1, mu[j] <= on[j] (unused columns off)."""

    def __init__(self, n_chains: int, n_cols: int) -> None:
        self.C, self.J = n_chains, n_cols
        self.mu, self.t = cp.Variable(n_cols, nonneg=True), cp.Variable()
        self.A, self.s, self.on = cp.Parameter((n_chains, n_cols)), cp.Parameter(n_chains), cp.Parameter(n_cols)
        self.rows = self.A @ self.mu - self.t <= self.s
        self.problem = cp.Problem(cp.Minimize(self.t), [self.rows, cp.sum(self.mu) == 1, self.mu <= self.on])
        if not self.problem.is_dpp():
            raise AssertionError("the master must be DPP (compile once)")
        self._cols: dict[int, int] | None = None

    def solve(self, M: np.ndarray, S: np.ndarray, Ys: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(lambda [C] over the given chains, mu [J] over the given columns), None if HiGHS fails."""
        A, s, on = np.zeros((self.C, self.J)), np.zeros(self.C), np.zeros(self.J)
        A[:len(M), :len(Ys)], s[:len(S)], on[:len(Ys)] = M @ Ys.T, S, 1.0
        self.A.value, self.s.value, self.on.value = A, s, on
        # through cvxpy's solving chain by hand (as `ilp_compact`): its problem data (DPP: the
        # cached matrices), HiGHS, and the rows' duals and mu read back by position; cvxpy's own
        # unpacking of every variable and dual costs nearly as much as HiGHS (0.45 against 0.6 ms, measured)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, chain, _ = self.problem.get_problem_data(cp.HIGHS, enforce_dpp=True)
        try:
            raw = chain.solver.solve_via_data(data, False, False, {"threads": 1, "random_seed": 0}, {})
        except cp.error.SolverError:
            return None
        if raw["model_status"] != "kOptimal" or not raw["solution"].dual_valid:
            return None
        self._cols = self._cols or data[PARAM_PROB].var_id_to_col
        n_eq = dims_to_solver_dict(data[cps.DIMS])[cps.EQ_DIM]  # sum(mu) == 1 first, then the chain rows
        lam = np.maximum(-np.asarray(raw["solution"].row_dual)[n_eq:n_eq + len(M)], 0.0)
        at = self._cols[self.mu.id]
        mu = np.asarray(raw["solution"].col_value, float)[at:at + len(Ys)]
        return lam / max(lam.sum(), 1e-300), mu


class LagrangianBound:
    """max over lambda of g(lambda) (module docstring), on a count of rounds. `rounds`: master
    solves per search; `max_nodes`: knapsack search nodes per inner solve (`mckp`); `max_chains`,
    `max_cols`: the master's size (the oldest rows and columns beyond it drop out). `stats`: searches,
    rounds, inner solves, inner solves not exhausted (their bound is the LP's), search nodes,
    searches that raised the bound, rounds at which no weighting could reach the target and probes
    called (`search`). `patience`: the stall rule of `search` (None: off, the default; bench/README.md,
    "Where the slow windows' time goes", has its trade)."""

    def __init__(self, rounds: int = 8, max_nodes: int = 1_000_000, max_chains: int = 24, max_cols: int = 24,
                 patience: int | None = None) -> None:
        if rounds < 1 or max_nodes < 1 or max_chains < 2 or max_cols < 2 or (patience is not None and patience < 0):
            raise ValueError(f"need rounds >= 1, max_nodes >= 1, max_chains >= 2, max_cols >= 2, patience None "
                             f"or >= 0; got {rounds}, {max_nodes}, {max_chains}, {max_cols}, {patience}")
        self.rounds, self.max_nodes, self.max_chains, self.max_cols = rounds, max_nodes, max_chains, max_cols
        self.patience = patience
        self._master = _Master(max_chains, max_cols)
        self._master.solve(np.eye(2), np.zeros(2), np.eye(2))  # cvxpy compiles here, never inside a solve
        self.stats = dict.fromkeys(("searches", "rounds", "inner", "inner_cut", "nodes", "raised", "unreachable", "probed"), 0)

    def bound(self, load, e, dev, cap: int, chain: Chain, known: list[np.ndarray]) -> tuple[float, np.ndarray]:
        """g at one weighting (m, s) of chains: (a lower bound on the least stall, the inner
        placement); `known`: placements that fit, the best of them under m the search's first
        incumbent."""
        m = np.asarray(chain[0], np.float64)
        start = min(known, key=lambda ks: float(load @ m[ks])) if known else None
        lower, ks, _, nodes, exact = mckp(load, e, dev, cap, m, self.max_nodes, start)
        self.stats["inner"] += 1
        self.stats["nodes"] += nodes
        self.stats["inner_cut"] += not exact
        return lower * (1 - PROOF_RTOL) - PROOF_RTOL - float(chain[1]), ks

    def search(self, link: LinkEval, load, e, dev, cap: int, chains: list[Chain], placements: list[np.ndarray],
               lower: float, target: float, descend: Callable[[np.ndarray, float], float] | None = None,
               probe: Callable[[], float | None] | None = None) -> tuple[float, list[np.ndarray]]:
        """(the best lower bound on the least stall: `lower` or a g(lambda) above it, the inner
        placements met). `chains`: valid rows to start from (the LP's weighting first, when there
        is one); `placements`: placements that fit, the master's first columns; stops once the
        bound reaches `target` (the stall that the caller's best plan proves at).

        `descend(placement, bound)`: called on each inner placement as it is met (the caller's
        primal heuristic, from the bound so far), returns the new target (the caller's best plan
        may have improved; then a lower bound proves it). Each round also tests whether any
        weighting can still reach the target: every g(lambda) is at most stall(Y) for any mix Y of
        placements that fit (g(lambda) is a minimum over them, at most their mix's weighted
        chains, and stall >= each chain), so once the stall of the master's mixed loads is below
        the target, no round can prove the caller's plan (`stats["unreachable"]` counts such
        rounds); more rounds only help through the placements they meet, whose descents may lower
        the target. `patience` (the stall rule, off when None): stop at such a round once that many
        inner placements in a row did not lower the target. `probe()`: called once, at the first
        such round: another lower bound on the least stall (the caller's), or None; a bound from it
        that reaches the target ends the search (`stats["probed"]`)."""
        self.stats["searches"] += 1
        K = len(dev)
        rows = [(np.asarray(m, np.float64), float(s)) for m, s in chains][-self.max_chains:]
        cols = [np.bincount(ks, weights=load, minlength=K) for ks in placements][-self.max_cols:]
        met, start = [], lower
        known = [np.asarray(ks, np.int64) for ks in placements]
        idle = 0  # inner placements met since the target last fell

        def meet(ks: np.ndarray) -> None:
            nonlocal target, idle
            met.append(ks)
            known.append(ks)
            new_target = target if descend is None else descend(ks, lower)
            idle = 0 if new_target < target else idle + 1
            target = min(target, new_target)

        if rows:  # the first weighting: the first chain alone (the LP's, when there is one)
            value, ks = self.bound(load, e, dev, cap, rows[0], known)
            lower = max(lower, value)
            meet(ks)
            cols.append(np.bincount(ks, weights=load, minlength=K))
        for _ in range(self.rounds):
            if lower >= target:
                break
            M, S = np.array([m for m, _ in rows]), np.array([s for _, s in rows])
            solved = self._master.solve(M, S, np.array(cols))
            self.stats["rounds"] += 1
            if solved is None:
                break
            lam, mu = solved
            mixed = np.array(cols).T @ mu
            if float(link.stall(mixed[None])[0]) < target:  # no weighting can reach the target (above)
                self.stats["unreachable"] += 1
                if probe is not None:
                    probed, probe = probe(), None
                    self.stats["probed"] += 1
                    if probed is not None and probed >= target:
                        lower = max(lower, probed)
                        break
                if self.patience is not None and idle >= self.patience:  # the stall rule
                    break
            value, ks = self.bound(load, e, dev, cap, (lam @ M, float(lam @ S)), known)
            lower = max(lower, value)
            meet(ks)
            new = False
            for Y in (np.bincount(ks, weights=load, minlength=K), mixed):
                m, s, _ = link.chain(Y)
                if not any(s == s2 and np.array_equal(m, m2) for m2, s2 in rows):
                    rows.append((m, float(s)))
                    new = True
            cols.append(np.bincount(ks, weights=load, minlength=K))
            rows, cols = rows[-self.max_chains:], cols[-self.max_cols:]
            if not new and any(np.array_equal(ks, p) for p in met[:-1]):
                break  # nothing new for the master: lambda would not move
        self.stats["raised"] += lower > start
        return lower, met


def _warm_up() -> None:
    """Compile (or load from the on-disk cache) the kernels for the signatures `mckp` uses, when
    this module is imported: never inside a solve."""
    for start in (None, np.array([1, 0])):
        mckp(np.array([1.0, 2.0]), np.array([1, 1]), np.array([2, 0]), 2, np.array([0.0, 2.0]), 4, start)


_warm_up()
