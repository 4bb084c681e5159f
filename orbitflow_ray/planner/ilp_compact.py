"""The central planner's placement ILP: a compact cvxpy model solved by HiGHS, warm-started from
the fast path's plan and never worse than it.

Compact model (one window W, units of one layer's compute c, data from `problem.window_data`):

    x[r, k] in {0, 1}, sum_k x[r, k] = 1        request r uses distance class k
    Y[k] = sum_r load[r] * x[r, k]              class loads: the link rows see only these K numbers
    U[j] >= U[j-1] >= 0                         stall accumulated through layer j
    sum_{r,k} cap[r, k] * x[r, k] <= cap_rhs    device KV at the window's end
    count[a, b, :] . Y - (U[b] - U[a-1]) <= b - a   one row per critical interval (a, b) only
    minimise  ucoef * U[L-1] + sum_{r,k} hostload[r, k] * x[r, k]

Compared with the reference (`ilp.py`) it has no violation binaries and no big-M rows: for a
fixed window every request sees the same T, so the late set only grows with T and the least-T
plan has the fewest violations (`problem.py`); the violation count is read off the plan. Distance
classes aggregate the link side (K class loads instead of R x L per-layer terms) and only the
intervals every split crosses get a row (`problem.critical_intervals`: 267 rows at L = 32 with
11 distances, 1421 at L = 80). Ties on T go to the fewest link bytes by a second solve of the same
compiled problem (`problem.tie_data`: hostload on, ucoef off, U[L-1] capped at the tie limit).

Every datum is a cvxpy Parameter (DPP: `problem.is_dpp()`), so a shape (requests, layers,
distances) compiles once; a re-solve only writes parameter values and cvxpy re-applies them to
the cached matrix. cvxpy's HiGHS interface warm-starts only from its own previous solve, so the
solve goes through cvxpy's solving chain by hand (`get_problem_data` -> the chain's HiGHS
`solve_via_data` with a solver cache holding the incumbent -> columns read back by
`var_id_to_col`): the incumbent handed to HiGHS is the fast path's plan, with its exact stalls.

Window: the fast path searches the windows (`problem.search_windows`); the ILP re-solves the
placement at the window the fast plan chose (at most one MIP, plus its tie-break solve), since a
MIP per candidate window costs several times as much for a rarely different answer.

What a solve costs (measured with HiGHS's log on bench/planner.py's 32 x 32 instances): the LP
relaxation takes about 4 ms, but HiGHS's root node (cut separation and probing on the knapsack
and interval rows) about 250 ms of CPU whatever the options (presolve, probing lifting, symmetry
detection, cut-pool limits: none moved it). The root bound lies within about 1e-4 of T of the
optimum, but the fast plan 8e-4 to 3e-3 above it: finding the optimum and proving the 1e-4
default gap took 79, 931 and 5,116 nodes on three instances (a fourth: not in 1,000), so the
default budget (32 nodes) mostly returns FEASIBLE, sometimes improved. Hence two shortcuts: no
MIP at all when the fast path's certified lower bound (`FastPlanner.bound`) already proves its
plan within rel_gap (`stats["precertified"]`), and no tie-break MIP when the T solve spent its
budget without leaving the fast plan (`stats["tie_skipped"]`: the plan is FEASIBLE either way).

Budget: HiGHS runs single-threaded (deterministic) with a node limit (`max_nodes`) and an LP
iteration limit; `time_limit_s` is only a safety stop for a pathological instance. A deadline
(`set_deadline`: the central planner passes the worker's budget, so the plan is back before the
step that needs it) cuts that stop shorter; past it the fast plan is returned. Whatever
HiGHS returns is re-scored exactly (`problem.evaluate`) and compared with the fast plan on the
full objective (violations, T, link bytes, -W); the better plan wins, so a plan from here is
never worse than the fast path's.
"""

from __future__ import annotations

import time
import warnings

import cvxpy as cp
import highspy
import numpy as np
import scipy.sparse as sp
from cvxpy.settings import PARAM_PROB

from orbitflow_ray.planner.fastpath import FastPlanner
from orbitflow_ray.planner.ilp import ShapeCache, link_rows
from orbitflow_ray.planner.problem import (Plan, PlanInputs, PlanStatus, fits,
                                           make_plan, plan_better, step_time, tie_data,
                                           ties_with_fewer_bytes, violations_settled, window_counts,
                                           window_data)

_SOLVED = ("kOptimal",)
# The incumbent comes from the fast path, so HiGHS's primal heuristics (sub-MIPs at the root:
# most of its time on these models, measured) are off; branch and bound improves on the incumbent.
_NO_HEURISTICS = {"mip_heuristic_effort": 0.0, "mip_heuristic_run_rins": False,
                  "mip_heuristic_run_rens": False, "mip_heuristic_run_root_reduced_cost": False,
                  "mip_heuristic_run_feasibility_jump": False}
_STOPPED = ("kSolutionLimit", "kIterationLimit", "kTimeLimit", "kInterrupt")


class _Compiled:
    """The compact model of one (requests, layers, distances) shape."""

    def __init__(self, R: int, L: int, distances: tuple[int, ...]) -> None:
        K = len(distances)
        pairs, counts, E = link_rows(L, distances)
        self.R, self.K, self.L, self.distances = R, K, L, distances
        self.x = cp.Variable((R, K), boolean=True)
        self.Y, self.U = cp.Variable(K), cp.Variable(L, nonneg=True)
        self.params = {"load": cp.Parameter(R, nonneg=True), "cap": cp.Parameter((R, K), nonneg=True),
                       "cap_rhs": cp.Parameter(), "ucoef": cp.Parameter(nonneg=True),
                       "hostload": cp.Parameter((R, K), nonneg=True), "u_cap": cp.Parameter()}
        p, x, Y, U = self.params, self.x, self.Y, self.U
        cons = [cp.sum(x, axis=1) == 1, Y == p["load"] @ x,
                cp.sum(cp.multiply(p["cap"], x)) <= p["cap_rhs"],
                U[1:] >= U[:-1], U[L - 1] <= p["u_cap"]]
        if len(pairs):
            cons.append(sp.csr_matrix(counts) @ Y - E @ U <= (pairs[:, 1] - pairs[:, 0]).astype(float))
        objective = p["ucoef"] * U[L - 1] + cp.sum(cp.multiply(p["hostload"], x))
        self.problem = cp.Problem(cp.Minimize(objective), cons)
        if not self.problem.is_dpp():
            raise AssertionError("the compact placement model must be DPP (compile once per shape)")
        self._cols: dict[int, int] | None = None
        self.highs_s = 0.0  # HiGHS's own run time over all solves (the rest is cvxpy)
        self.nodes = 0

    def solve(self, data: dict, start: np.ndarray | None, options: dict) -> tuple[np.ndarray | None, str, float]:
        """(class per request or None, HiGHS model status, dual bound on the objective)."""
        for name, param in self.params.items():
            param.value = data[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            prob_data, chain, _ = self.problem.get_problem_data(cp.HIGHS, enforce_dpp=True)
        n_cols = prob_data["c"].shape[0]
        if self._cols is None:
            self._cols = prob_data[PARAM_PROB].var_id_to_col
        cache = {}
        if start is not None:
            cache[chain.solver.name()] = (None, None, {"model_status": "kOptimal",
                                                       "solution": self._incumbent(data, start, n_cols)})
        raw = chain.solver.solve_via_data(prob_data, start is not None, False, dict(options), cache)
        self.highs_s += raw["run_time"]
        self.nodes += int(raw["info"].mip_node_count)
        status = raw["model_status"]
        col = np.asarray(raw["solution"].col_value)
        if status not in _SOLVED + _STOPPED or len(col) != n_cols or not raw["solution"].value_valid:
            return None, status, 0.0
        at = self._cols[self.x.id]
        x = col[at:at + self.R * self.K].reshape((self.R, self.K), order="F")  # cvxpy is column-major
        return np.argmax(x, axis=1), status, float(raw["info"].mip_dual_bound)

    def _incumbent(self, data: dict, ks: np.ndarray, n_cols: int) -> highspy.HighsSolution:
        """A full feasible point for placement `ks`: x, its class loads and its least stalls."""
        x = np.zeros((self.R, self.K))
        x[np.arange(self.R), ks] = 1.0
        Y = data["load"] @ x
        need = window_counts(self.L, self.distances) @ Y - (np.arange(self.L)[None, :] - np.arange(self.L)[:, None])
        U = np.zeros(self.L + 1)
        for b in range(self.L):
            U[b + 1] = max(U[b], float(np.max(U[:b + 1] + need[:b + 1, b])))
        col = np.zeros(n_cols)
        for var, value in ((self.x, x.ravel(order="F")), (self.Y, Y), (self.U, U[1:])):
            at = self._cols[var.id]
            col[at:at + var.size] = value
        sol = highspy.HighsSolution()
        sol.col_value = col.tolist()
        sol.value_valid = True
        return sol


class CompactIlpPlanner:
    """The central planner's solver: the fast path's plan, improved by the compact ILP.

    `rel_gap`: HiGHS stops once T is proven within this factor of the optimum. `max_nodes`: its
    branch-and-bound node budget per window solve (deterministic; single thread). `stats` counts
    how each plan was settled: "improved" (the ILP beat the fast plan), "confirmed" (the ILP proved
    the fast plan optimal within rel_gap or found an equal one), "kept_fast" (the ILP stopped on
    its budget without a better plan: the fast plan is returned, labelled "fast")."""

    name = "cvxpy-highs"

    def __init__(self, rel_gap: float = 1e-4, max_nodes: int = 32, iteration_limit: int = 100_000,
                 time_limit_s: float = 2.0, max_cached: int = 32, fast: FastPlanner | None = None) -> None:
        if not (0 <= rel_gap < 1) or max_nodes < 1 or iteration_limit < 1 or time_limit_s <= 0:
            raise ValueError("need 0 <= rel_gap < 1, max_nodes >= 1, iteration_limit >= 1, time_limit_s > 0")
        self.rel_gap = rel_gap
        self.options = {"threads": 1, "mip_rel_gap": 0.0, "mip_max_nodes": max_nodes,
                        "simplex_iteration_limit": iteration_limit, "time_limit": time_limit_s,
                        "random_seed": 0, "mip_allow_restart": False, **_NO_HEURISTICS}
        self.fast = fast or FastPlanner(warm_start=True)
        self._shapes = ShapeCache(_Compiled, max_cached)
        self.last: dict[str, int] = {}
        self.stats = dict.fromkeys(("improved", "confirmed", "kept_fast", "windows", "stopped", "out_of_time",
                                    "precertified", "tie_skipped"), 0)
        self.deadline: float | None = None

    def set_deadline(self, at: float | None) -> None:
        """Stop HiGHS by `at` (time.perf_counter()); past it the fast plan is returned unimproved
        ("out_of_time"). The central planner sets it from the worker's budget, so that the plan
        is back before the step that needs it."""
        self.deadline = at

    @property
    def compiles(self) -> int:
        return self._shapes.compiles

    def compiled(self, inputs: PlanInputs) -> _Compiled:
        return self._shapes.get(inputs)

    def seed(self, distances: dict[str, int]) -> None:
        """Warm-start the next solve from this placement (the worker's current plan, by id)."""
        self.fast.last = dict(distances)

    def solve(self, inputs: PlanInputs) -> Plan:
        """The fast plan, then the ILP at the fast plan's window from it; the better plan wins."""
        started = time.perf_counter()
        fast = self.fast.solve(inputs)
        self.last = fast.distances
        if fast.status is PlanStatus.INFEASIBLE or not inputs.requests:
            return fast
        if self._time_left() <= 0:
            self.stats["out_of_time"] += 1
            return fast
        index = {d: k for k, d in enumerate(inputs.distances)}
        start = np.array([index[fast.distances[r.request_id]] for r in inputs.requests])
        ks, proven = self.solve_window(inputs, fast.window, start)
        choice = [inputs.distances[k] for k in ks]
        ilp = make_plan(inputs, choice, step_time(inputs, choice), fast.window,
                        PlanStatus.OPTIMAL if proven else PlanStatus.FEASIBLE, started, self.name)
        if plan_better(inputs, fast, ilp):
            self.stats["kept_fast"] += 1
            fast.solve_time_s = ilp.solve_time_s
            return fast
        self.stats["improved" if plan_better(inputs, ilp, fast) else "confirmed"] += 1
        self.last = ilp.distances
        return ilp

    def solve_window(self, inputs: PlanInputs, window: int, start: np.ndarray) -> tuple[np.ndarray, bool]:
        """Least T, then least link bytes at that T, from incumbent `start` when it fits; True when
        proven (within rel_gap, violation set settled). The T solve is skipped when the fast path's
        lower bound already proves `start` within rel_gap; the byte tie-break solve is skipped when
        the T solve stopped on its budget still at `start` (the plan is FEASIBLE either way)."""
        self.stats["windows"] += 1
        data, ds, c = window_data(inputs, window), np.array(inputs.distances), inputs.compute_per_layer_s
        L = inputs.num_layers
        start_fits = fits(inputs, window, start)
        lower = self.fast.bound(inputs, window) / c - L  # certified bound on U[L-1] (the stall)
        t_start = step_time(inputs, ds[start].tolist()) / c  # T / c; HiGHS's gap is rel_gap of it
        if start_fits and t_start - L <= lower + self.rel_gap * t_start:
            ks, proven, bound = start, True, lower
            self.stats["precertified"] += 1
        else:
            ks, proven, bound = self._fitting(inputs, window, data, start if start_fits else None)
            if ks is None:
                ks, proven, bound = start, False, 0.0
        bound = max(bound, lower)
        proven = proven and violations_settled(inputs, window, c * (L + bound), step_time(inputs, ds[ks].tolist()))
        if not proven and np.array_equal(ks, start):  # budget spent, nothing better: a second MIP
            self.stats["tie_skipped"] += 1  # would search again from the same incumbent
            return ks, False
        tie = tie_data(inputs, window, data, ds[ks].tolist())
        if tie is not None:
            ks_tie, tie_proven, _ = self._fitting(inputs, window, tie, ks)
            if ks_tie is not None and ties_with_fewer_bytes(inputs, window, ds[ks].tolist(), ds[ks_tie].tolist()):
                ks = ks_tie
            proven = proven and tie_proven
        return ks, proven

    def _time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def _fitting(self, inputs: PlanInputs, window: int, data: dict, start: np.ndarray | None
                 ) -> tuple[np.ndarray | None, bool, float]:
        compiled = self.compiled(inputs)
        # the objective is U[L-1] = T / c - L: a gap of rel_gap on T is rel_gap * T / c on it
        t_over_c = inputs.num_layers if start is None else step_time(
            inputs, [inputs.distances[k] for k in start]) / inputs.compute_per_layer_s
        options = {**self.options, "mip_abs_gap": self.rel_gap * t_over_c,
                   "time_limit": max(1e-3, min(self.options["time_limit"], self._time_left()))}
        for _ in range(3):  # HiGHS may overshoot the capacity row by its feasibility tolerance:
            # then re-solve with the row's bound just under that plan (exact check in `fits`)
            ks, status, bound = compiled.solve(data, start, options)
            if ks is None:
                return None, False, 0.0
            self.stats["stopped"] += status != "kOptimal"
            if fits(inputs, window, ks):
                return ks, status == "kOptimal", bound
            data = {**data, "cap_rhs": float(data["cap"][np.arange(len(ks)), ks].sum()) - 1e-5}
        return None, False, 0.0
