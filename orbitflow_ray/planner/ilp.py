"""The placement ILP in cvxpy, solved with HiGHS: the reference formulation.

The model of `problem.py`, for one window W, in units of one layer's compute time c (so the data
are O(1) numbers whatever the hardware). With K distance classes and the critical intervals
(a, b) of `problem.critical_intervals`:

    x[r, k] in {0, 1}  request r uses distance k        sum_k x[r, k] = 1
    Y[k]               link load of class k             Y[k] = sum_r load[r] * x[r, k]
    U[j] >= 0          stall accumulated through layer j, U[j] >= U[j-1]
    v[r] in {0, 1}     r misses its effective SLO
      capacity         sum_{r,k} cap[r, k] * x[r, k] <= 1
      link, per (a, b) sum_k count[a, b, k] * Y[k] - (U[b] - U[a-1]) <= b - a      (U[-1] = 0)
      SLO (big-M)      U[L-1] - M[r] * v[r] <= slack[r]
    minimise           weight * sum_r v[r] + U[L-1]          (T = c * (L + U[L-1]))

    load[r]  = n_r * kvb / (BW * c)             layers of compute one host layer of r takes to move
    cap[r,k] = (L - host_k) * (n_r + g_r) * kvb / capacity
    slack[r] = effective_slo_r / c - L           stall r tolerates before it is late
    U_ub     = max_k host_k * sum_r load[r]      no chain of disjoint intervals holds more transfer
                                                time than all transfers together, so U[L-1] <= U_ub
    M[r]     = max(0, U_ub - slack[r]),  weight = U_ub + 1

weight > U_ub makes the objective lexicographic: one violation fewer always beats any difference
in stall. (In this model violations are a nondecreasing function of T, so any weight > 0 gives the
same optimum; the large weight keeps it right if that ever changes.)

All data enter as cvxpy Parameters (DPP), so a problem compiles once per (requests, layers,
distance set); later solves only write parameter values. The distance set is a deployment
constant, so in practice this is once per (batch size, model).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from orbitflow_ray.planner.problem import (Plan, PlanInputs, critical_intervals, host_layers,
                                           search_windows)

HIGHS_OPTIONS = {"mip_rel_gap": 1e-7, "mip_abs_gap": 1e-7, "threads": 1, "output_flag": False}


def window_data(inputs: PlanInputs, window: int) -> dict[str, np.ndarray | float]:
    """The parameter values of one window, shared by the cvxpy and the direct HiGHS models."""
    L, kvb = inputs.num_layers, inputs.kv_bytes_per_token_per_layer
    c = inputs.compute_per_layer_s
    n = np.array([r.context_tokens for r in inputs.requests], dtype=float)
    load = n * kvb / (inputs.link_bytes_per_s * c)
    dev = inputs.device_layers().astype(float)
    cap = np.outer(inputs.end_tokens(window) * float(kvb), dev) / max(inputs.device_capacity_bytes, 1)
    slack = np.array([r.effective_slo_s(window) for r in inputs.requests]) / c - L
    u_ub = float(max(len(host_layers(d, L)) for d in inputs.distances) * load.sum())
    return {"load": load, "cap": cap, "slack": slack, "bigm": np.maximum(0.0, u_ub - slack),
            "weight": u_ub + 1.0}


class _Compiled:
    """One parametrised problem for a (requests, layers, distances) shape."""

    def __init__(self, R: int, L: int, distances: tuple[int, ...]) -> None:
        K = len(distances)
        pairs, counts = critical_intervals(L, distances)
        rows = np.arange(len(pairs))
        keep = pairs[:, 0] >= 1
        E = sp.csr_matrix((np.r_[np.ones(len(pairs)), -np.ones(keep.sum())],
                           (np.r_[rows, rows[keep]], np.r_[pairs[:, 1], pairs[keep, 0] - 1])),
                          shape=(len(pairs), L))
        self.x = cp.Variable((R, K), boolean=True)
        self.v = cp.Variable(R, boolean=True)
        Y, U = cp.Variable(K), cp.Variable(L, nonneg=True)
        self.params = {"load": cp.Parameter(R, nonneg=True), "cap": cp.Parameter((R, K), nonneg=True),
                       "slack": cp.Parameter(R), "bigm": cp.Parameter(R, nonneg=True),
                       "weight": cp.Parameter(nonneg=True)}
        p = self.params
        cons = [cp.sum(self.x, axis=1) == 1,
                Y == p["load"] @ self.x,
                cp.sum(cp.multiply(p["cap"], self.x)) <= 1,
                U[1:] >= U[:-1],
                U[L - 1] - cp.multiply(p["bigm"], self.v) <= p["slack"]]
        if len(pairs):
            cons.append(sp.csr_matrix(counts) @ Y - E @ U <= (pairs[:, 1] - pairs[:, 0]).astype(float))
        self.problem = cp.Problem(cp.Minimize(p["weight"] * cp.sum(self.v) + U[L - 1]), cons)
        assert self.problem.is_dcp(dpp=True)

    def solve(self, data: dict, options: dict) -> tuple[np.ndarray, bool]:
        for name, param in self.params.items():
            param.value = data[name]
        self.problem.solve(solver=cp.HIGHS, warm_start=True, **options)
        if self.x.value is None:
            raise RuntimeError(f"HiGHS returned {self.problem.status} on a capacity-feasible window")
        return np.argmax(self.x.value, axis=1), self.problem.status == cp.OPTIMAL


class IlpPlanner:
    """Solves plans through cvxpy + HiGHS, keeping compiled problems by shape (LRU)."""

    name = "cvxpy-highs"

    def __init__(self, time_limit_s: float = 2.0, max_cached: int = 32, **highs_options) -> None:
        self.options = {**HIGHS_OPTIONS, "time_limit": time_limit_s, **highs_options}
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple, _Compiled] = OrderedDict()
        self.compiles = 0

    def compiled(self, inputs: PlanInputs) -> _Compiled:
        key = (len(inputs.requests), inputs.num_layers, inputs.distances)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = _Compiled(*key)
            self.compiles += 1
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return self._cache[key]

    def solve(self, inputs: PlanInputs) -> Plan:
        ds = np.array(inputs.distances)

        def solve_at(window: int) -> tuple[list[int], bool]:
            ks, proven = self.compiled(inputs).solve(window_data(inputs, window), dict(self.options))
            return ds[ks].tolist(), proven

        return search_windows(inputs, solve_at, self.name)


_DEFAULT = IlpPlanner()


def solve(inputs: PlanInputs) -> Plan:
    """Plan with a process-wide planner (its compiled problems are shared)."""
    return _DEFAULT.solve(inputs)
