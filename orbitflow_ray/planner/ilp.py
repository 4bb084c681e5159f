"""The placement ILP in cvxpy, solved with HiGHS: the reference formulation.

The model of `problem.py`, for one window W, in units of one layer's compute time c (so the data
are O(1) numbers whatever the hardware). Structure used: requests enter the link rows only through
the K class loads Y (a layer's transfer demand depends only on which distances put it on host),
and only critical intervals (a, b) get a row: every split of (a, b) in two is crossed by a transfer
inside it (`problem.critical_intervals`; the others are implied): 267 rows for L = 32 with the
default 11 distances (all-host included), 1421 for L = 80.

    x[r, k] in {0, 1}  request r uses distance k        sum_k x[r, k] = 1
    Y[k]               link load of class k             Y[k] = sum_r load[r] * x[r, k]
    U[j] >= 0          stall accumulated through layer j, U[j] >= U[j-1]
    v[r] in {0, 1}     r misses its effective SLO
      capacity         sum_{r,k} cap[r, k] * x[r, k] <= 1      (see solve_window for the 1)
      link, per (a, b) sum_k count[a, b, k] * Y[k] - (U[b] - U[a-1]) <= b - a      (U[-1] = 0)
      SLO (big-M)      S - M[r] * v[r] <= slack[r]
    minimise           weight * sum_r v[r] + S               (T = c * (L + S))
    S                = U[L-1] + lin . Y          the stall and the copies' compute, lin[k] =
                                                 copy_ratio * host_k (`problem.step_time`; the
                                                 term and lin exist only where copies cost
                                                 compute, copy_ratio > 0: the CPU backend)

    load[r]  = n_r * kvb / (BW * c)             layers of compute one host layer of r takes to move
    cap[r,k] = (L - host_k) * (n_r + g_r) * kvb / capacity
    slack[r] = effective_slo_r / c - L           stall r tolerates before it is late
    U_ub     = max_k host_k * (1 + copy_ratio) * sum_r load[r]   no chain of disjoint intervals
                                                holds more transfer time than all transfers
                                                together, so S <= U_ub
    M[r]     = max(0, U_ub - slack[r]),  weight = U_ub + 1

weight > U_ub makes the objective lexicographic: one violation fewer always beats any difference
in stall. (In this model violations are a nondecreasing function of T, so any weight > 0 gives the
same optimum; the large weight keeps it right if that ever changes.)

Ties on T go to the placement moving the fewest bytes (`problem.py`'s third key), by a second
solve of the same compiled problem with other parameter values (`problem.tie_data`):

    minimise           sum_{r,k} load[r] * host_k * x[r, k]      (link bytes, in load's units)
      with             S <= u_cap        (the tie limit of the first solve's T)
                       v[r] <= v_ub[r]   (no request late that was on time)

The first solve has hostload = 0, ucoef = 1 and caps that bind nothing, so one model serves both.

All data enter as cvxpy Parameters (DPP), so a problem compiles once per (requests, layers,
distance set, copies cost compute or not); later solves only write parameter values. The distance set is a deployment
constant, so in practice this is once per (batch size, model).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from orbitflow_ray.planner.problem import (Plan, PlanInputs, critical_intervals, fits, search_windows,
                                           tie_data, ties_with_fewer_bytes, window_data)


class ShapeCache:
    """Compiled problems by (requests, layers, distances, copies cost compute) shape, least recently
    used dropped past `max_cached`: with DPP a re-solve of a cached shape only writes parameter
    values."""

    def __init__(self, build: Callable[[int, int, tuple[int, ...], bool], Any], max_cached: int) -> None:
        self.build, self.max_cached = build, max_cached
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self.compiles = 0

    def values(self) -> list[Any]:
        return list(self._cache.values())

    def get(self, inputs: PlanInputs) -> Any:
        key = (len(inputs.requests), inputs.num_layers, inputs.distances, inputs.copy_ratio > 0)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = self.build(*key)
            self.compiles += 1
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return self._cache[key]


def link_rows(L: int, distances: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """The critical intervals (a, b), their per-distance transfer counts, and E [pairs, L] with
    E @ U = U[b] - U[a - 1] (the compute time between a and b, U cumulative)."""
    pairs, counts = critical_intervals(L, distances)
    rows = np.arange(len(pairs))
    keep = pairs[:, 0] >= 1
    E = sp.csr_matrix((np.r_[np.ones(len(pairs)), -np.ones(keep.sum())],
                       (np.r_[rows, rows[keep]], np.r_[pairs[:, 1], pairs[keep, 0] - 1])),
                      shape=(len(pairs), L))
    return pairs, counts, E


class _Compiled:
    """One parametrised problem for a (requests, layers, distances, copies cost compute) shape."""

    def __init__(self, R: int, L: int, distances: tuple[int, ...], copy: bool = False) -> None:
        K = len(distances)
        pairs, counts, E = link_rows(L, distances)
        self.x = cp.Variable((R, K), boolean=True)
        self.v = cp.Variable(R, boolean=True)
        Y, U = cp.Variable(K), cp.Variable(L, nonneg=True)
        self.params = {"load": cp.Parameter(R, nonneg=True), "cap": cp.Parameter((R, K), nonneg=True),
                       "slack": cp.Parameter(R), "bigm": cp.Parameter(R, nonneg=True),
                       "cap_rhs": cp.Parameter(), "weight": cp.Parameter(nonneg=True),
                       "ucoef": cp.Parameter(nonneg=True), "hostload": cp.Parameter((R, K), nonneg=True),
                       "u_cap": cp.Parameter(), "v_ub": cp.Parameter(R, nonneg=True)}
        p = self.params
        S, S_cost = U[L - 1], p["ucoef"] * U[L - 1]
        if copy:  # the copies' compute, linear in the class loads (`problem.copy_layers`)
            p["lin"], p["ulin"] = cp.Parameter(K, nonneg=True), cp.Parameter(K, nonneg=True)
            S, S_cost = S + p["lin"] @ Y, S_cost + p["ulin"] @ Y
        cons = [cp.sum(self.x, axis=1) == 1,
                Y == p["load"] @ self.x,
                cp.sum(cp.multiply(p["cap"], self.x)) <= p["cap_rhs"],
                U[1:] >= U[:-1],
                S - cp.multiply(p["bigm"], self.v) <= p["slack"],
                S <= p["u_cap"], self.v <= p["v_ub"]]
        if len(pairs):
            cons.append(sp.csr_matrix(counts) @ Y - E @ U <= (pairs[:, 1] - pairs[:, 0]).astype(float))
        objective = p["weight"] * cp.sum(self.v) + S_cost + cp.sum(cp.multiply(p["hostload"], self.x))
        self.problem = cp.Problem(cp.Minimize(objective), cons)
        self.solver_s = 0.0  # HiGHS's own time over all solves, to split out cvxpy's share
        assert self.problem.is_dcp(dpp=True)

    def solve(self, data: dict, options: dict) -> tuple[np.ndarray, bool]:
        for name, param in self.params.items():
            param.value = data[name]
        with warnings.catch_warnings():  # a time-limited solve warns; the caller reports FEASIBLE
            warnings.simplefilter("ignore", UserWarning)
            # No warm start: through cvxpy, HiGHS handed the previous solve's answer as its start
            # reported it optimal in a tie-break where a plan with half the link bytes was feasible
            # (tests/test_ilp.py's property test, a flaky failure): a reference solves cold.
            self.problem.solve(solver=cp.HIGHS, warm_start=False, **options)
        self.solver_s += self.problem.solver_stats.solve_time or 0.0
        if self.x.value is None:
            raise RuntimeError(f"HiGHS: {self.problem.status} on a capacity-feasible window")
        return np.argmax(self.x.value, axis=1), self.problem.status == cp.OPTIMAL


class IlpPlanner:
    """Solves plans through cvxpy + HiGHS, keeping compiled problems by shape (LRU).

    `rel_gap`: HiGHS stops once the objective is within rel_gap * L (in units of c) of its bound,
    so T is within rel_gap of the optimum and the violation count is exact (weight > gap)."""

    name = "cvxpy-highs"

    def __init__(self, rel_gap: float = 1e-4, time_limit_s: float = 2.0, max_cached: int = 32) -> None:
        self.rel_gap = rel_gap
        self.options = {"mip_rel_gap": 0.0, "time_limit": time_limit_s, "threads": 1}
        self._shapes = ShapeCache(_Compiled, max_cached)

    @property
    def compiles(self) -> int:
        return self._shapes.compiles

    def compiled(self, inputs: PlanInputs) -> _Compiled:
        return self._shapes.get(inputs)

    def solve_window(self, inputs: PlanInputs, window: int) -> tuple[np.ndarray, bool]:
        """Least (violations, T), then least link bytes at that T (module docstring)."""
        data, ds = window_data(inputs, window), np.array(inputs.distances)
        ks, proven = self._fitting(inputs, window, data)
        tie = tie_data(inputs, window, data, ds[ks].tolist())
        if tie is not None:
            ks_tie, tie_proven = self._fitting(inputs, window, tie)
            if ties_with_fewer_bytes(inputs, window, ds[ks].tolist(), ds[ks_tie].tolist()):
                ks = ks_tie
            proven = proven and tie_proven
        return ks, proven

    def _fitting(self, inputs: PlanInputs, window: int, data: dict) -> tuple[np.ndarray, bool]:
        options = {**self.options, "mip_abs_gap": self.rel_gap * inputs.num_layers}
        for _ in range(3):  # HiGHS may overshoot the capacity row by its feasibility tolerance:
            # then re-solve with the row's bound just under that plan (exact check in `fits`)
            ks, proven = self.compiled(inputs).solve(data, options)
            if fits(inputs, window, ks):
                return ks, proven
            # just under that plan, past HiGHS's mip_feasibility_tolerance (1e-6)
            data["cap_rhs"] = float(data["cap"][np.arange(len(ks)), ks].sum()) - 1e-5
        raise RuntimeError("HiGHS kept returning plans over capacity")

    def solve(self, inputs: PlanInputs) -> Plan:
        ds = np.array(inputs.distances)

        def solve_at(window: int) -> tuple[list[int], bool]:
            ks, proven = self.solve_window(inputs, window)
            return ds[ks].tolist(), proven

        return search_windows(inputs, solve_at, self.name)


_DEFAULT: IlpPlanner | None = None


def solve(inputs: PlanInputs) -> Plan:
    """Plan with a process-wide planner (its compiled problems are shared)."""
    global _DEFAULT
    _DEFAULT = _DEFAULT or IlpPlanner()
    return _DEFAULT.solve(inputs)
