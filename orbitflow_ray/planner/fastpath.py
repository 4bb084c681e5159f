"""Fast path: a certified heuristic for the placement problem, falling back to the MIP.

Why not just the MIP: the LP relaxation is tight (within 1e-5 of the integer optimum in our
measurements), but the integer part is a subset-sum over request sizes, and HiGHS spends 0.3-2 s
at 32 requests x 32 layers in primal heuristics before it holds a good plan. Here the two halves
are done with the problem's structure instead:

Lower bound (Lagrangian, one chain at a time). The stall is a longest path, so for any chain C of
disjoint link intervals, stall >= sum_r load_r * m_C[k_r] - s_C (m_C[k]: class-k transfers inside
C, s_C: compute layers of C). That bound is separable over requests, so its minimum under the
capacity row is a multiple-choice knapsack whose LP relaxation is a sort (every request's choices
are the same K points scaled by its size, so all share one convex hull). Iterating on the critical
chain of each knapsack solution gives a bound that matched the full LP relaxation to 1e-5 in our
tests, in about a millisecond.

Primal (greedy + local search, exact cost). Start from the previous plan when it still fits,
else from no offload and offload greedily by least stall added per byte freed (each round scores
every move exactly, then applies the best prefix of the ranked moves); then improve with single
moves and swaps of requests of similar size, each round scored exactly in one batched
longest-path evaluation. Last, ties on T go to the placement moving the fewest bytes (`reclaim`:
requests move back towards device while the plan fits and T stays within its tie limit), so a
link that hides every transfer is not given transfers for nothing.

Certificate: when T(plan) <= T_lower_bound * (1 + rel_gap) the plan is optimal within rel_gap
(status OPTIMAL; it certifies T and the violation set: the byte tie-break is exact when
enumerating, greedy otherwise). Small batches, where a knapsack bound is loose (one request is a
large share of the load), take other routes: up to ENUM_LIMIT placements x intervals are
enumerated exactly; an uncertified batch of up to BNB_MAX_REQUESTS goes to a depth-first branch
and bound on the same bounds (BNB_MAX_NODES nodes), and then, if `fallback_time_limit_s` > 0, to
the reduced MIP (`ilp_highs`) seeded with the best plan. By default there is no MIP fallback: an
uncertified window returns its best plan as FEASIBLE (the proven gaps land in `gaps`).

Deterministic budget: with the default (no MIP fallback) nothing here reads a clock: greedy
rounds, local-search rounds, chain iterations and branch-and-bound nodes are counts, so the same
inputs (and warm start) give the same plan on a quiet or a loaded machine; only the time it takes
changes. This is what the worker runs on its decode thread; the central planner runs it too and
then tries to improve its plan with the cvxpy ILP (`ilp_compact.py`).

Compiled (Numba, `linkjit.py`): the whole per-window search but its Python glue: the greedy
offload, `improve` (each round scores only the candidates whose chain bound does not pass the best
found: the same argmin), `reclaim`, the chain-following `lower_bound`, the knapsacks of every chain
at once (seeded bounds) and `branch_and_bound`, besides the batched longest path of
`LinkEval.stall` and `LinkEval.chain`. They give the numpy versions' numbers bit for bit (numpy's
one-vector einsum sum, pairwise sums, BLAS dots and matrix-vector products and argsort ties are
reproduced; tests/test_fastpath_jit.py against the numpy code in tests/fastpath_reference.py), so
the plans are the ones the numpy version made. They compile, or load from the on-disk cache, when
this module is imported: never inside a solve. The knapsack hull is cached by chain and the
per-window arrays by inputs (`_arrays`). Measured in CPU time on the shared 2-core box: bench/README.md
("Planner fast path").
"""

from __future__ import annotations

import functools

import numpy as np

from orbitflow_ray.planner.ilp_highs import HighsPlanner
from orbitflow_ray.planner.linkjit import CompiledLink, frozen, knapsack, knapsacks, lower_bound_chains
from orbitflow_ray.planner.linkjit import branch_and_bound as bnb_jit
from orbitflow_ray.planner.problem import (Plan, PlanInputs, critical_intervals, host_layers,
                                           search_windows, tie_limit, violations_settled, window_loads)


ENUM_LIMIT = 1_000_000  # enumerate when placements (K^R) x link intervals is at most this (a few ms)
BNB_MAX_REQUESTS = 24  # uncertified batches up to this size go to branch and bound before the MIP
# Branch-and-bound nodes per window: the budget is a count so that a plan never depends on the
# machine's load (bench/planner.py measures what it costs).
BNB_MAX_NODES = 48
GREEDY_REACH = 3  # greedy offload moves a request at most this many classes down per round
BATCH_SLACK = 0.25  # greedy offload applies every ranked move whose joint ratio is this near the best


class LinkEval:
    """Least stall (in compute layers) of many class-load vectors at once, over critical intervals.

    `copy_ratio` > 0 (`PlanInputs.copy_ratio`: the copies cost compute, the CPU backend): the
    stall includes the copies' compute, copy_ratio * host layers of class k per unit of class load
    (`problem.step_time`), as one more interval on a virtual layer L past the last, spanning no
    compute, whose transfers are the step's host layers: U[L + 1] = U[L] + that term. Every search
    here and in the central ILP (greedy, descent, chains, knapsack bounds, branch and bound) then
    prices it, with no change to the compiled code; a chain through it bounds stall + copies."""

    def __init__(self, num_layers: int, distances: tuple[int, ...], copy_ratio: float = 0.0) -> None:
        if not copy_ratio >= 0:
            raise ValueError(f"copy_ratio must be >= 0, got {copy_ratio}")
        pairs, counts = critical_intervals(num_layers, distances)
        order = np.argsort(pairs[:, 1], kind="stable")  # grouped by end: need[g] is a view
        pairs, counts = pairs[order], counts[order]
        self.L = num_layers
        self.whole_m = np.array([len(host_layers(d, num_layers)) for d in distances], dtype=float)
        self.last_deadline = float(pairs[:, 1].max()) if len(pairs) else 0.0
        path_layers = num_layers
        if copy_ratio > 0:  # the copies' compute: interval (L, L), no compute inside it
            pairs = np.vstack([pairs, [[num_layers, num_layers]]])
            counts = np.vstack([counts, copy_ratio * self.whole_m[None, :]])
            path_layers += 1
            self.whole_m = self.whole_m + copy_ratio * self.whole_m  # the whole step's chain with it
        self.counts, self.a, self.span = counts, pairs[:, 0], (pairs[:, 1] - pairs[:, 0]).astype(float)
        bounds = np.searchsorted(pairs[:, 1], np.arange(path_layers + 1))
        self.by_end = [slice(bounds[j], bounds[j + 1]) for j in range(path_layers)]
        self.jit = CompiledLink(self.counts, self.a, self.span, bounds)

    def stall(self, Y: np.ndarray) -> np.ndarray:
        """Least stall of each row of Y [N, K] (class loads in compute layers), compiled: [N]."""
        return self.jit.stall(Y)

    def stall_numpy(self, Y: np.ndarray) -> np.ndarray:
        """`stall` as a numpy loop over layers: the reference the compiled loop is tested against."""
        # einsum, not matmul: multithreaded BLAS on a busy host costs 100x at these sizes
        need = np.einsum("ik,kn->in", self.counts, np.ascontiguousarray(Y.T)) - self.span[:, None]
        U = np.zeros((len(self.by_end) + 1, Y.shape[0]))
        for j, g in enumerate(self.by_end):
            if g.stop > g.start:
                np.maximum(U[j], (U[self.a[g]] + need[g]).max(0), out=U[j + 1])
            else:
                U[j + 1] = U[j]
        return U[-1]

    def chain(self, Y: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """(m_C, s_C, U) of the critical chain of one load vector; U[j+1]: stall through layer j."""
        return self.jit.chain(self.counts @ Y - self.span)


@functools.lru_cache(maxsize=32)
def link_eval(num_layers: int, distances: tuple[int, ...], copy_ratio: float = 0.0) -> LinkEval:
    return LinkEval(num_layers, distances, copy_ratio)


def knapsack_bound(load, e, dev, cap, m) -> tuple[float, np.ndarray, int]:
    """LP optimum of min sum_r load_r m[k_r] s.t. sum_r e_r dev[k_r] <= cap, an integral rounding
    of it (the one fractional request takes its next hull point) and that request (-1: none)."""
    f = np.float64
    hull = _hull(np.asarray(dev, dtype=f).tobytes(), np.asarray(m, dtype=f).tobytes())
    value, pos, frac = knapsack(frozen(load, f), np.asarray(e, f), np.asarray(dev, f), float(cap),
                                np.asarray(m, f), hull, float(load.sum()), float(e.sum()))
    return value, hull[pos], int(frac)


ChainTable = tuple[np.ndarray, np.ndarray, np.ndarray]  # (M [C, K], hulls [C, K] padded, hull lengths [C])


def chain_table(dev, chains: list[Chain]) -> ChainTable:
    """The chains' m and knapsack hulls as arrays, for `chain_knapsacks`."""
    f = np.float64
    key, K = np.asarray(dev, f).tobytes(), len(dev)
    M = np.array([np.asarray(m, f) for m, _ in chains]).reshape(len(chains), K)
    hulls, n_hull = np.zeros((len(chains), K), dtype=np.int64), np.zeros(len(chains), dtype=np.int64)
    for c, m in enumerate(M):
        hull = _hull(key, m.tobytes())
        hulls[c, :len(hull)], n_hull[c] = hull, len(hull)
    return M, hulls, n_hull


def chain_knapsacks(load, e, dev, cap, table: ChainTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`knapsack_bound` for the m of each chain of `table` in one compiled call (the same numbers):
    (values [C], hull positions per request [C, R], fractional requests [C])."""
    f = np.float64
    load_sum, e_sum = float(load.sum()), float(e.sum())
    return knapsacks(frozen(load, f), np.asarray(e, f), np.asarray(dev, f), float(cap), *table, load_sum, e_sum)


@functools.lru_cache(maxsize=4096)
def _hull(dev_bytes: bytes, m_bytes: bytes) -> np.ndarray:
    """Lower convex hull of (dev, m) towards less device memory (class indices); cached: the same
    chains come back in every window, bound and branch-and-bound node of a solve."""
    dev, m = np.frombuffer(dev_bytes), np.frombuffer(m_bytes)
    hull = [int(np.lexsort((dev, m))[0])]
    while True:
        cur = hull[-1]
        cand = np.flatnonzero(dev < dev[cur])
        if not len(cand):
            break
        slope = (m[cand] - m[cur]) / (dev[cur] - dev[cand])
        best = cand[slope <= slope.min() + 1e-12]
        hull.append(int(best[np.argmin(dev[best])]))
    out = np.array(hull)
    out.flags.writeable = False
    return out


Chain = tuple[np.ndarray, float]  # (class-k transfers inside the chain, compute layers in it)


def lower_bound(link: LinkEval, load, e, dev, cap, seeds: list[Chain] | None = None,
                iters: int = 8) -> tuple[float, list[Chain]]:
    """Best single-chain knapsack bound on the stall, and the chains tried. Without seeds it
    starts from the whole-step interval (0, last deadline) (with the copies' virtual interval
    where copies cost compute: `LinkEval`) and follows critical chains (compiled:
    `linkjit.lower_bound_chains`)."""
    if seeds:
        values = chain_knapsacks(load, e, dev, cap, chain_table(dev, seeds))[0]
        return max(0.0, max(v - s for (_, s), v in zip(seeds, values.tolist()))), seeds
    f, j = np.float64, link.jit
    best, M, S = lower_bound_chains(j.counts, j.span, j.a, j.group, frozen(load, f), np.asarray(e, f),
                                    np.asarray(dev, f), float(cap), link.whole_m,
                                    link.last_deadline, iters,
                                    float(load.sum()), float(e.sum()))
    return float(best), list(zip(M, S.tolist()))


def offload_greedy(link: LinkEval, load, e, dev, cap, ks) -> np.ndarray:
    """Offload more until the plan fits: rank every move by stall added per capacity freed (the
    part of it still needed), then apply the best prefix of the per-request best moves. Compiled
    (`linkjit._greedy`; the numpy version is tests/fastpath_reference.py)."""
    return link.jit.greedy(load, e, dev, cap, ks, GREEDY_REACH, BATCH_SLACK)


def size_partners(load, partners: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of requests at most `partners` apart in size order: (smaller, larger) index arrays."""
    by_size = np.argsort(load, kind="stable")
    i, j = _near_pairs(len(load), partners)
    return by_size[i], by_size[j]


@functools.lru_cache(maxsize=256)
def _near_pairs(n: int, partners: int) -> tuple[np.ndarray, np.ndarray]:
    """np.triu_indices(n, 1) restricted to pairs at most `partners` apart (cached: every window
    and trial of a batch size asks for the same)."""
    i, j = np.triu_indices(n, 1)
    near = (j - i) <= partners
    i, j = i[near], j[near]
    i.flags.writeable = j.flags.writeable = False
    return i, j


def improve(link: LinkEval, load, e, dev, cap, ks, rounds: int = 12, partners: int = 6) -> np.ndarray:
    """Steepest descent over single moves and swaps of requests close in size, within capacity.
    Compiled (`linkjit._improve`, each round `_improve_round`)."""
    return link.jit.improve(load, e, dev, cap, ks, *size_partners(load, partners), rounds)


def enumerate_best(link: LinkEval, load, e, dev, cap, tie, chunk: int = 4096) -> np.ndarray:
    """Exact optimum by scoring every placement that fits (small batches only): least stall, and
    among those within `tie(least stall)` the fewest link bytes."""
    R, K = len(load), len(dev)
    combos = np.stack(np.meshgrid(*[np.arange(K)] * R, indexing="ij"), -1).reshape(-1, R)
    combos = combos[dev[combos] @ e <= cap]
    stall = np.concatenate([link.stall(((part[:, :, None] == np.arange(K)) * load[None, :, None]).sum(1))
                            for part in np.array_split(combos, -(-len(combos) // chunk))])
    near = np.flatnonzero(stall <= tie(stall.min()))
    moved = (load * (link.L - dev)[combos[near]]).sum(1)
    return combos[near[np.argmin(moved)]]


def reclaim(link: LinkEval, load, e, dev, cap, ks, stall_cap: float, partners: int = 6) -> np.ndarray:
    """Fewer link bytes at a tie: move requests to classes with fewer host layers, or swap the
    classes of two requests close in size so the larger one moves less, while the plan fits and
    its stall stays within `stall_cap`. Greedy (most bytes saved first), so not always the least.
    Compiled (`linkjit._reclaim`; the numpy version is tests/fastpath_reference.py)."""
    return link.jit.reclaim(load, e, dev, cap, ks, stall_cap, *size_partners(load, partners))


def branch_and_bound(link: LinkEval, load, e, dev, cap, chains: list[Chain], ks, rel_gap: float,
                     max_nodes: int = 48) -> tuple[np.ndarray, bool]:
    """Depth-first search over requests' classes from incumbent `ks`. A node's bound is the best
    chain knapsack over its free requests (chains grow with every critical chain met, appended to
    `chains`); it branches on the knapsack's fractional request. Stops after `max_nodes` nodes (a
    count, not a clock: the plan is the same on a busy machine). True when every node was pruned
    (optimal within rel_gap). Compiled (`linkjit.branch_and_bound`)."""
    j, K, f = link.jit, len(dev), np.float64
    M0 = np.array([np.asarray(m, f) for m, _ in chains]).reshape(len(chains), K)
    best, proven, M, S = bnb_jit(j.counts, j.span, j.a, j.group, frozen(load, f), frozen(e, np.int64),
                                 frozen(dev, np.int64), int(cap), M0, np.array([s for _, s in chains], dtype=f),
                                 np.asarray(ks, np.int64), float(rel_gap), int(max_nodes), _child_order(K), link.L)
    chains.extend(zip(M, S.tolist()))
    return best, bool(proven)


@functools.lru_cache(maxsize=64)
def _child_order(K: int) -> np.ndarray:
    """[K, K]: for a rounded class c, the order branch and bound pushes its children (the rounded
    class last, so it is tried first): numpy's argsort of -|k - c|, ties as numpy orders them."""
    out = np.array([np.argsort(-np.abs(np.arange(K) - c)) for c in range(K)], dtype=np.int64).reshape(K, K)
    out.flags.writeable = False
    return out


class FastPlanner:
    """Certified heuristic per window (module docstring).

    `rel_gap`: accept a plan once T is proven within this factor of the optimum (1 %: the greedy
    lands within 0.1-0.9 % of the bound at 16+ requests, and the cost model itself is a fit).
    A plan whose violation set is not proven (an effective SLO inside [bound, T]) or whose gap is
    not closed is returned with status FEASIBLE. `stats` counts how each window was settled."""

    name = "fast"

    def __init__(self, rel_gap: float = 1e-2, fallback_time_limit_s: float = 0.0,
                 warm_start: bool = True, bnb_max_nodes: int = BNB_MAX_NODES) -> None:
        if bnb_max_nodes < 1 or fallback_time_limit_s < 0:
            raise ValueError("need bnb_max_nodes >= 1 and fallback_time_limit_s >= 0")
        self.rel_gap, self.warm_start, self.bnb_max_nodes = rel_gap, warm_start, bnb_max_nodes
        self.fallback_time_limit_s = fallback_time_limit_s
        self.mip = HighsPlanner(violations=False, rel_gap=rel_gap, time_limit_s=fallback_time_limit_s)
        self.gaps: list[float] = []  # proven bound on T / T_opt - 1 of each window solved heuristically
        self.last: dict[str, int] = {}
        self.stats = dict.fromkeys(("enumerated", "certified", "branch_and_bound", "bnb_out_of_nodes",
                                    "fallback", "violations_unsettled"), 0)
        self._chains: list[Chain] = []
        self._memo_inputs: PlanInputs | None = None
        self._memo: dict[int, tuple] = {}

    def set_deadline(self, at: float | None) -> None:
        """No wall clock here: the budget is counted (`PlacementSolver`)."""

    def _arrays(self, inputs: PlanInputs, window: int):
        """(link, load [R], end tokens [R], device layers [K], capacity in token-layers) of a
        window, kept while the same inputs come back (every window, bound and trial of a solve)."""
        if inputs is not self._memo_inputs:
            self._memo_inputs, self._memo = inputs, {}
        if window not in self._memo:
            load = window_loads(inputs) if window == inputs.windows[0] else self._arrays(
                inputs, inputs.windows[0])[1]  # the load does not depend on the window
            dev, e = inputs.device_layers().astype(np.int64), inputs.end_tokens(window)
            for arr in (load, dev, e):
                arr.flags.writeable = False
            cap = inputs.device_capacity_bytes // inputs.kv_bytes_per_token_per_layer
            link = link_eval(inputs.num_layers, inputs.distances, inputs.copy_ratio)
            self._memo[window] = link, load, e, dev, cap
        return self._memo[window]

    def bound(self, inputs: PlanInputs, window: int) -> float:
        """Lower bound on T (seconds) at this window, from the chains of the last solve."""
        link, load, e, dev, cap = self._arrays(inputs, window)
        lb, self._chains = lower_bound(link, load, e.astype(float), dev.astype(float), float(cap),
                                       self._chains)
        return inputs.compute_per_layer_s * (inputs.num_layers + lb)

    def solve_window(self, inputs: PlanInputs, window: int) -> tuple[np.ndarray, bool]:
        link, load, e, dev, cap = self._arrays(inputs, window)
        L, c = inputs.num_layers, inputs.compute_per_layer_s

        def tie(F: float) -> float:  # problem.tie_limit of a stall, in stall units
            return tie_limit(inputs, window, c * (L + F)) / c - L

        def stall(ks: np.ndarray) -> float:
            return link.stall(np.bincount(ks, weights=load, minlength=len(dev))[None])[0]

        if len(dev) ** len(load) * max(len(link.a), 1) <= ENUM_LIMIT:
            self.stats["enumerated"] += 1
            return enumerate_best(link, load, e, dev, cap, tie), True
        lb, self._chains = lower_bound(link, load, e.astype(float), dev.astype(float), float(cap))
        t_lower = c * (L + lb)
        ks = improve(link, load, e, dev, cap, offload_greedy(link, load, e, dev, cap, self._start(inputs)))
        proven = c * (L + stall(ks)) <= t_lower * (1 + self.rel_gap)
        if proven:
            self.stats["certified"] += 1
        elif len(load) <= BNB_MAX_REQUESTS:
            ks, proven = branch_and_bound(link, load, e, dev, cap, self._chains, ks, self.rel_gap,
                                          self.bnb_max_nodes)
            self.stats["branch_and_bound" if proven else "bnb_out_of_nodes"] += 1
            t_lower = c * (L + stall(ks)) / (1 + self.rel_gap) if proven else t_lower
        if not proven and self.fallback_time_limit_s > 0:
            self.stats["fallback"] += 1
            ks_mip, proven, bound = self.mip.solve_window(inputs, window, start=ks)
            t_lower = max(t_lower, c * bound)
            if stall(ks_mip) < stall(ks):
                ks = ks_mip
        ks = reclaim(link, load, e, dev, cap, ks, tie(stall(ks)))  # T within its tie limit
        t_plan = c * (L + stall(ks))
        self.gaps.append(t_plan / t_lower - 1)
        if not violations_settled(inputs, window, t_lower, t_plan):
            self.stats["violations_unsettled"] += 1
            proven = False
        return ks, proven

    def solve(self, inputs: PlanInputs) -> Plan:
        ds = np.array(inputs.distances)

        def solve_at(window: int) -> tuple[list[int], bool]:
            ks, proven = self.solve_window(inputs, window)
            return ds[ks].tolist(), proven

        self._chains = []  # chains belong to one (layers, distances) problem
        plan = search_windows(inputs, solve_at, self.name, lambda w: self.bound(inputs, w))
        self.last = plan.distances
        return plan

    def seed(self, distances: dict[str, int]) -> None:
        """Warm-start the next solve from this placement (by request id)."""
        self.last = dict(distances)

    def _start(self, inputs: PlanInputs) -> np.ndarray:
        """The previous plan (by request id; new requests start on device), else no offload."""
        dev = inputs.device_layers()
        index = {d: k for k, d in enumerate(inputs.distances)}
        top = int(np.argmax(dev))
        if not self.warm_start:
            return np.full(len(inputs.requests), top)
        L = inputs.num_layers
        return np.array([index.get(min(self.last.get(r.request_id, L), L), top) for r in inputs.requests])
