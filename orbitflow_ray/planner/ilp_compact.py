"""The central planner's placement ILP: a compact cvxpy model, its LP relaxation and a
chain-restricted MIP solved by HiGHS, warm-started from the fast path's plan and never worse than it.

Compact model (one window W, units of one layer's compute c, data from `problem.window_data`):

    x[r, k] in {0, 1}, sum_k x[r, k] = 1        request r uses distance class k
    Y[k] = sum_r load[r] * x[r, k]              class loads: the link rows see only these K numbers
    U[j] >= U[j-1] >= 0                         stall accumulated through layer j
    sum_{r,k} cap[r, k] * x[r, k] <= cap_rhs    device KV at the window's end
    count[a, b, :] . Y - (U[b] - U[a-1]) <= b - a   one row per critical interval (a, b) only
    minimise  ucoef * S + sum_{r,k} hostload[r, k] * x[r, k]
    S = U[L-1] (+ lin . Y where copies cost compute: `ilp.py`, `problem.step_time`)

Compared with the reference (`ilp.py`) it has no violation binaries and no big-M rows: for a
fixed window every request sees the same T, so the late set only grows with T and the least-T
plan has the fewest violations (`problem.py`); the violation count is read off the plan. Distance
classes aggregate the link side (K class loads instead of R x L per-layer terms) and only the
intervals every split crosses get a row (`problem.critical_intervals`: 267 rows at L = 32 with
11 distances, 1421 at L = 80). Ties on T go to the fewest link bytes by a second solve of the same
compiled problem (`problem.tie_data`: hostload on, ucoef off, S capped at the tie limit)
when T is settled to a tie (below, "Ties on bytes").

Every datum is a cvxpy Parameter (DPP: `problem.is_dpp()`), so a shape (requests, layers,
distances, copies cost compute) compiles once (the chain MIP's model below too, on the first window of its shape that runs the chain search,
whether or not a chain MIP runs there); a re-solve only writes parameter values and cvxpy re-applies them to
the cached matrix. cvxpy's HiGHS interface warm-starts only from its own previous solve, so the
solve goes through cvxpy's solving chain by hand (`get_problem_data` -> the chain's HiGHS
`solve_via_data` with a solver cache holding the incumbent -> columns read back by
`var_id_to_col`): the incumbent handed to HiGHS is the fast path's plan, with its exact stalls.

Window: the fast path searches the windows (`problem.search_windows`); the ILP re-solves the
placement at the window the fast plan chose, since a MIP per candidate window costs several times
as much for a rarely different answer.

How the T solve searches (`search`, default "chains"), everything through cvxpy (DPP) and HiGHS:

- "chains" (lazy chain generation). (1) HiGHS solves the LP relaxation of the compact model above
  (`_Compiled.relaxation`: cvxpy's matrices of the boolean model, integrality dropped). Its link
  rows' duals, as one weighting of link intervals, give a row t >= m . Y - s that every placement
  satisfies and whose knapsack minimum equals the LP bound. (2) Our primal heuristic
  (`ilp_targets.TargetSearch`, with `heuristic=True`, the default) proposes plans from the LP's
  face: the knapsack's integral rounding over that row and the LP solution's rounding, then the
  fast plan, each improved by a compiled descent over one- and two-request moves scored exactly
  (its module docstring says why the fast plan's basin is the wrong one). Its best plan replaces
  the incumbent when its exact stall is lower; when its T is within rel_gap of the lower bound
  (below) the window is proven without any MIP (`stats["heuristic_proven"]`). (2b) Otherwise the
  Lagrangian bound (`ilp_lagrange.LagrangianBound`, with `lagrange=True`, the default): over
  weightings of the chains met, the exact integral knapsack under the capacity row, a lower bound
  above the LP's where the capacity row's integrality is what separates the plan from the LP bound;
  each knapsack solution is a start for the heuristic's descent (a Lagrangian heuristic) as soon as
  it is met, whose plan replaces the incumbent when its exact stall is lower; the search stops as
  soon as its bound proves the incumbent (`stats["lagrange_proven"]`: windows proven here, with no
  MIP). At the search's first round at which no weighting can prove the incumbent (`ilp_lagrange`:
  the stall of the master's mix of placements is below the target), the probe (`probe=True`, the
  default): the root node of the chain MIP of (3) below from the best plan so far, with no
  presolve, restarts or primal heuristics (`_PROBE`), whose dual bound ends the search when it
  proves that plan (`stats["probe_proven"]`; 32 x 32 seed 0 batch 1: 63 ms with the Lagrangian's
  6 rounds and a chain MIP, 24-27 ms with the probe after the first round); when it does not
  prove, nothing from it is used. (3) Otherwise a small MIP in cvxpy (`_ChainModel`: x, Y, the capacity row and C_MAX such rows, minimise t) is
  solved by HiGHS from the incumbent, with that row, the fast path's chains and the incumbent's
  critical chain. It is a relaxation of the compact model (a longest path is at least any chain),
  so its dual bound is a lower bound on the least stall; its answer is scored exactly
  (`fastpath.LinkEval`), and if the answer's critical chain is new it is added and the MIP solved
  again (at most `max_rounds`); HiGHS's absolute gap is set so that its stop implies our proof.
  What proves OPTIMAL: the best plan's exact T within rel_gap of the best lower bound, the largest
  of the LP row's knapsack minimum (in our arithmetic, not HiGHS's tolerances), the fast path's
  chains' knapsacks, the Lagrangian bound (its integral knapsacks, in our arithmetic, less 1e-9
  relative and absolute: `ilp_lagrange`) and the chain MIP's dual bound less 1e-9 (the probe's too); and its
  violation set settled (`problem.violations_settled`). The heuristic proves nothing by itself.
- "mip": HiGHS branch and bound on the compact model itself, its heuristics off (the former
  default; kept as a reference and for bench/planner.py's before/after).

What a solve costs (process time on a shared 2-core machine, bench/planner.py --cpu-time, 20
cold batches per cell): on the compact model HiGHS's root node (cut separation and probing on the
knapsack and interval rows) takes about 250 ms whatever the options, and the fast plan lies 8e-4
to 3e-3 above the optimum, so "mip" returned mostly FEASIBLE plans on its 32-node budget. The LP
bound is tight for most batches (on one 32 x 32 bench instance solved to 1e-6 the optimum lay
8e-6 of T above it); the problem is finding the plan. Before `ilp_targets`, HiGHS's sub-MIP
heuristics (RENS, RINS) in the chain MIP's root node found it, at 180 / 520 ms p50 / p99 at
32 x 32 and 1,060 / 1,600 ms at 128 x 80. With it, the heuristic's plan is proven against the LP
bound in 80 % (32 x 32, 48 of 60 batches) to all (128 x 80) of the bench's batches, in the time of
the fast path, the LP and a few ms of descent: 10.6 / 74 ms p50 / p99 at 32 x 32, 93 / 151 ms
at 128 x 80 (bench/README.md has the table). The rest go on to the chain MIP: on 9 of those 60
batches no plan found lies within rel_gap of the LP bound (the MIP's dual bound proves 7 of them),
on 3 the descent stopped short of a plan the MIP then found; there a window costs what it did
before (up to about 2 s). The Lagrangian bound and heuristic (2b) prove 7 of the 12 such windows
of those 60 batches with no MIP (5 go on to it: 881 against 1,461 ms p99) and bring 32 x 80's p99
from 522 to 145 ms; where the bound stays short the gap comes from mixing placements, which it does
not convexify, not from the capacity row (bench/README.md, "The Lagrangian bound"). With the probe
(the chain MIP's root node as a bound, once the Lagrangian search cannot prove) the bench's 20
batches at 32 x 32 take 10.9 / 24 ms p50 / p99; over 100 batches (seeds 1 and 2) 11.2 / 447 and
9.5 / 560 ms: about one window in ten still goes on to the chain MIP (0.1-1 s). All of that is at
rel_gap 1e-4. The default is 1e-3 (`CENTRAL_REL_GAP`, which says why): there the heuristic's plan
or the fast path's certified bound proves 399 of the bench's 400 windows (100 per cell) with no MIP,
32 x 32 at 8.2 / 14.9 ms and 128 x 80 at 51 / 156 ms, the plans' T 2.6e-4 above the 1e-4 plans'
on average (bench/README.md, "The proof gap").

Ties on bytes: a plan whose T is settled to the tie tolerance (T_RTOL; e.g. no stall, or
rel_gap <= T_RTOL) gets the tie-break MIP on the compact model (`problem.tie_data`); otherwise
the fast path's greedy `reclaim` at the plan's tie limit (proving least bytes among plans that
only tie within rel_gap is not attempted). Shortcut: no MIP at all when the fast path's
certified lower bound (`FastPlanner.bound`) already proves its plan within rel_gap
(`stats["precertified"]`).

Budget: HiGHS runs single-threaded (deterministic) with a node limit (`max_nodes`) and an LP
iteration limit per MIP, `max_rounds` chain MIPs per window; `time_limit_s` is only a safety stop
for a pathological instance. A deadline (`set_deadline`: the central planner passes the worker's
budget, so the plan is back before the step that needs it) cuts that stop shorter; past it the
best plan so far is returned. Whatever HiGHS returns is checked exactly (`problem.fits`,
`problem.evaluate`) and compared with the fast plan on the full objective (violations, T, link
bytes, -W); the better plan wins, so a plan from here is never worse than the fast path's.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import cvxpy as cp
import highspy
import numpy as np
import scipy.sparse as sp
import cvxpy.settings as cps
from cvxpy.reductions.solvers.conic_solvers.highs_conif import dims_to_solver_dict
from cvxpy.settings import PARAM_PROB

from orbitflow_ray.planner.fastpath import Chain, FastPlanner, knapsack_bound, offload_greedy, reclaim
from orbitflow_ray.planner.ilp import ShapeCache, link_rows
from orbitflow_ray.planner.ilp_lagrange import LagrangianBound
from orbitflow_ray.planner.ilp_targets import TargetSearch
from orbitflow_ray.planner.problem import (T_RTOL, Plan, PlanInputs, PlanStatus, fits,
                                           make_plan, plan_better, step_time, tie_data, tie_limit,
                                           ties_with_fewer_bytes, violations_settled, window_counts,
                                           window_data)

_SOLVED = ("kOptimal",)
# The incumbent comes from the fast path, so HiGHS's primal heuristics (sub-MIPs at the root:
# most of its time on these models, measured) are off; branch and bound improves on the incumbent.
_NO_HEURISTICS = {"mip_heuristic_effort": 0.0, "mip_heuristic_run_rins": False,
                  "mip_heuristic_run_rens": False, "mip_heuristic_run_root_reduced_cost": False,
                  "mip_heuristic_run_feasibility_jump": False}
C_MAX = 16  # chain rows of the chain-restricted MIP (`_ChainModel`)
SEARCHES = ("chains", "mip")  # how the T solve searches (`CompactIlpPlanner`)
_TIGHT = {"mip_feasibility_tolerance": 1e-9, "primal_feasibility_tolerance": 1e-9}
_STOPPED = ("kSolutionLimit", "kIterationLimit", "kTimeLimit", "kInterrupt")
# The central ILP's default proof gap: a plan is OPTIMAL once its T is proven within 0.1 % of the
# optimum. Tighter buys nothing a step can feel: against the same batches proven within 1e-4, the
# plans' T was 2.6e-4 higher on average (9.3e-4 at most) with the same SLO-miss count in every batch,
# while the cost model that T comes from predicts real steps within 3-4 % (`orbitflow calibrate`);
# and at 1e-4 about one window in ten needs the chain MIP (0.1-1 s: p99 407-560 ms at 32 x 32) where
# at 1e-3 the heuristic's plan or the fast path's certified bound proves 399 of the bench's 400
# windows with no MIP (bench/README.md, "The proof gap").
CENTRAL_REL_GAP = 1e-3
# the probe (`CompactIlpPlanner._probe`): the chain MIP's root only, as a bound. Presolve and
# restarts off: with them the root cost up to 100 ms on windows it does not prove (measured)
_PROBE = {**_NO_HEURISTICS, "mip_max_nodes": 1, "mip_allow_restart": False, "presolve": "off"}


def _problem_data(problem: cp.Problem, params: dict[str, cp.Parameter], values: dict) -> tuple[dict, Any]:
    """Write the parameter values; cvxpy applies them to its cached matrices (DPP). Returns
    (the HiGHS problem data, cvxpy's solving chain)."""
    for name, param in params.items():
        param.value = values[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prob_data, chain, _ = problem.get_problem_data(cp.HIGHS, enforce_dpp=True)
    return prob_data, chain


class _Compiled:
    """The compact model of one (requests, layers, distances, copies cost compute) shape."""

    def __init__(self, R: int, L: int, distances: tuple[int, ...], copy: bool = False) -> None:
        K = len(distances)
        pairs, counts, E = link_rows(L, distances)
        self.R, self.K, self.L, self.distances = R, K, L, distances
        self.x = cp.Variable((R, K), boolean=True)
        self.Y, self.U = cp.Variable(K), cp.Variable(L, nonneg=True)
        self.params = {"load": cp.Parameter(R, nonneg=True), "cap": cp.Parameter((R, K), nonneg=True),
                       "cap_rhs": cp.Parameter(), "ucoef": cp.Parameter(nonneg=True),
                       "hostload": cp.Parameter((R, K), nonneg=True), "u_cap": cp.Parameter()}
        p, x, Y, U = self.params, self.x, self.Y, self.U
        S, S_cost = U[L - 1], p["ucoef"] * U[L - 1]
        if copy:  # the copies' compute, linear in the class loads (`problem.copy_layers`)
            p["lin"], p["ulin"] = cp.Parameter(K, nonneg=True), cp.Parameter(K, nonneg=True)
            S, S_cost = S + p["lin"] @ Y, S_cost + p["ulin"] @ Y
        cons = [cp.sum(x, axis=1) == 1, Y == p["load"] @ x,
                cp.sum(cp.multiply(p["cap"], x)) <= p["cap_rhs"],
                U[1:] >= U[:-1], S <= p["u_cap"]]
        if len(pairs):
            cons.append(sp.csr_matrix(counts) @ Y - E @ U <= (pairs[:, 1] - pairs[:, 0]).astype(float))
        objective = S_cost + cp.sum(cp.multiply(p["hostload"], x))
        self.problem = cp.Problem(cp.Minimize(objective), cons)
        if not self.problem.is_dpp():
            raise AssertionError("the compact placement model must be DPP (compile once per shape)")
        self._cols: dict[int, int] | None = None
        self.pairs, self.counts, self.copy = pairs, counts, copy
        self.highs_s = 0.0  # HiGHS's own run time over all solves (the rest is cvxpy)
        self.nodes = 0

    def relaxation(self, data: dict, options: dict) -> tuple[float, Chain, np.ndarray] | None:
        """The LP relaxation (x in [0, 1]) of this compiled model with these parameter values,
        solved by HiGHS: (its optimum, the multiplier it certifies, x [R, K]), None if HiGHS did
        not solve it.

        cvxpy writes the parameters into its cached matrices (`get_problem_data`, DPP); the LP is
        the MIP's data with the integrality dropped, passed to HiGHS as in cvxpy's own interface.
        The multiplier is the link rows' duals lambda >= 0 as one "chain" (m, s) = (counts^T lambda,
        spans . lambda), scaled so no layer is covered more than once: then for any placement,
        stall >= m . Y - s (each row reads count . Y - span <= U[b] - U[a-1], and a weighting that
        covers each layer at most once sums those increments to at most U[L-1]). At the LP
        optimum the multiple-choice knapsack over (m, s) (`fastpath.knapsack_bound`) equals the LP
        bound, so the branch and bound prices every node with it at the cost of a sort. Where
        copies cost compute, m includes their term (`lin`, added once): the row bounds S."""
        prob_data, _ = _problem_data(self.problem, self.params, data)
        self._cols = self._cols or prob_data[PARAM_PROB].var_id_to_col
        A, b, c = prob_data[cps.A].tocsc(), prob_data[cps.B], prob_data[cps.C]
        n_eq, inf = dims_to_solver_dict(prob_data[cps.DIMS])[cps.EQ_DIM], highspy.kHighsInf
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = A.shape[1], A.shape[0]
        lp.col_cost_, lp.row_upper_ = c, b
        lp.row_lower_ = np.concatenate([b[:n_eq], np.full(len(b) - n_eq, -inf)])
        lower, upper = prob_data[cps.LOWER_BOUNDS], prob_data[cps.UPPER_BOUNDS]
        lower = np.full(A.shape[1], -inf) if lower is None else lower.copy()
        upper = np.full(A.shape[1], inf) if upper is None else upper.copy()
        binary = np.asarray(prob_data[cps.BOOL_IDX], dtype=int)
        lower[binary], upper[binary] = np.maximum(lower[binary], 0.0), np.minimum(upper[binary], 1.0)
        lp.col_lower_, lp.col_upper_ = lower, upper
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
        highs = highspy.Highs()
        highs.setOptionValue("output_flag", False)
        for name, value in options.items():
            highs.setOptionValue(name, value)
        highs.passModel(lp)
        highs.run()
        self.highs_s += highs.getRunTime()
        if highs.getModelStatus() != highspy.HighsModelStatus.kOptimal or not len(self.pairs):
            return None
        # the link rows are the model's last constraint, so the last rows of its data
        solution = highs.getSolution()
        lam = np.maximum(-np.asarray(solution.row_dual)[-len(self.pairs):], 0.0)
        at = self._cols[self.x.id]
        x = np.asarray(solution.col_value)[at:at + self.R * self.K].reshape((self.R, self.K), order="F")
        cover = np.zeros(self.L + 1)
        np.add.at(cover, self.pairs[:, 0], lam)
        np.add.at(cover, self.pairs[:, 1] + 1, -lam)
        scale = max(1.0, float(np.cumsum(cover).max()))
        spans = (self.pairs[:, 1] - self.pairs[:, 0]).astype(float)
        m = self.counts.T @ lam / scale + (data["lin"] if self.copy else 0.0)
        return highs.getInfo().objective_function_value, (m, float(spans @ lam) / scale), x

    def solve(self, data: dict, start: np.ndarray | None, options: dict) -> tuple[np.ndarray | None, str, float]:
        """(class per request or None, HiGHS model status, dual bound on the objective)."""
        prob_data, chain = _problem_data(self.problem, self.params, data)
        n_cols = prob_data["c"].shape[0]
        self._cols = self._cols or prob_data[PARAM_PROB].var_id_to_col
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


class _ChainModel:
    """The chain-restricted placement MIP of one (requests, distances) shape, in cvxpy (DPP):

        x[r, k] in {0, 1}, sum_k x[r, k] = 1,  Y = load @ x,  sum_{r,k} cap[r, k] x[r, k] <= cap_rhs
        t >= M[i] . Y - s[i]  for each of C_MAX rows (m, s): chains of link intervals, or a
                              weighting of them (`_Compiled.relaxation`); unused rows are zero
        minimise t

    Each row is a valid lower bound on the stall (with the copies' compute where they cost it:
    `fastpath.LinkEval`'s chains include its virtual interval, the LP row adds the term) of any
    placement (a longest path is at least any chain), so this is a relaxation of the compact model: its optimum is a lower bound on the
    least stall, and a solution whose exact stall equals its t is optimal for the full model."""

    def __init__(self, R: int, K: int) -> None:
        self.R, self.K = R, K
        self.x, self.Y, self.t = cp.Variable((R, K), boolean=True), cp.Variable(K), cp.Variable(nonneg=True)
        self.params = {"load": cp.Parameter(R, nonneg=True), "cap": cp.Parameter((R, K), nonneg=True),
                       "cap_rhs": cp.Parameter(), "M": cp.Parameter((C_MAX, K), nonneg=True),
                       "s": cp.Parameter(C_MAX)}
        p, x = self.params, self.x
        self.problem = cp.Problem(cp.Minimize(self.t), [
            cp.sum(x, axis=1) == 1, self.Y == p["load"] @ x, cp.sum(cp.multiply(p["cap"], x)) <= p["cap_rhs"],
            p["M"] @ self.Y - self.t <= p["s"]])
        if not self.problem.is_dpp():
            raise AssertionError("the chain-restricted model must be DPP (compile once per shape)")
        # cvxpy compiles the DPP problem at its first problem data (about 20 ms at 32 x 11): here,
        # with the compact model's compile, not inside the first window that needs a chain MIP
        zeros = {"load": np.zeros(R), "cap": np.zeros((R, K)), "cap_rhs": 0.0, "M": np.zeros((C_MAX, K)),
                 "s": np.zeros(C_MAX)}
        self._cols = _problem_data(self.problem, self.params, zeros)[0][PARAM_PROB].var_id_to_col
        self.highs_s, self.nodes = 0.0, 0

    def solve(self, data: dict, chains: list[Chain], start: np.ndarray, options: dict
              ) -> tuple[np.ndarray | None, str, float]:
        """(class per request or None, HiGHS model status, HiGHS's dual bound on the least stall),
        from incumbent `start` (classes per request; it must fit)."""
        M, sv = np.zeros((C_MAX, self.K)), np.zeros(C_MAX)
        for i, (m, s) in enumerate(chains[:C_MAX]):
            M[i], sv[i] = m, s
        values = {"load": data["load"], "cap": data["cap"], "cap_rhs": data["cap_rhs"], "M": M, "s": sv}
        prob_data, chain = _problem_data(self.problem, self.params, values)
        x = np.zeros((self.R, self.K))
        x[np.arange(self.R), start] = 1.0
        Y = data["load"] @ x
        col = np.zeros(prob_data["c"].shape[0])
        for var, value in ((self.x, x.ravel(order="F")), (self.Y, Y), (self.t, [max(0.0, float((M @ Y - sv).max()))])):
            at = self._cols[var.id]
            col[at:at + var.size] = value
        incumbent = highspy.HighsSolution()
        incumbent.col_value, incumbent.value_valid = col.tolist(), True
        cache = {chain.solver.name(): (None, None, {"model_status": "kOptimal", "solution": incumbent})}
        raw = chain.solver.solve_via_data(prob_data, True, False, dict(options), cache)
        self.highs_s += raw["run_time"]
        self.nodes += int(raw["info"].mip_node_count)
        status, col = raw["model_status"], np.asarray(raw["solution"].col_value)
        if status not in _SOLVED + _STOPPED or len(col) != len(prob_data["c"]) or not raw["solution"].value_valid:
            return None, status, 0.0
        at = self._cols[self.x.id]
        xs = col[at:at + self.R * self.K].reshape((self.R, self.K), order="F")
        return np.argmax(xs, axis=1), status, float(raw["info"].mip_dual_bound)


class CompactIlpPlanner:
    """The central planner's solver: the fast path's plan, improved by the compact ILP.

    `rel_gap`: a plan is OPTIMAL once its T is proven within this factor of the optimum (then
    the search stops; default `CENTRAL_REL_GAP`, 1e-3). `max_nodes`: HiGHS's branch-and-bound node budget per MIP (deterministic;
    single thread). `search`: "chains" or "mip" (module docstring); `max_rounds`: chain MIPs per
    window ("chains"); `prove`: when the chain search ends unproven, go on with the whole-model
    MIP from its best plan on the remaining budget (exact given the budget; off by default, where
    the deadline counts more than the last rel_gap); `heuristic`: run `ilp_targets.TargetSearch`
    after the LP ("chains"). `stats` counts how each plan was settled: "improved" (the ILP beat the fast
    plan), "confirmed" (the ILP proved the fast plan optimal within rel_gap or found an equal one),
    "kept_fast" (the ILP stopped on its budget without a better plan: the fast plan is returned,
    labelled "fast"), "heuristic_proven" (windows proven on the heuristic's plan with no chain MIP),
    "lagrange_proven" (proven after the Lagrangian bound, with no chain MIP), and the solves run
    ("lp_solves", "chain_mips", "tie_mips", "probes"), "probe_proven" (windows proven by the probe);
    `targets.stats` the heuristic's, `lagrange_bound.stats` the bound's. `lagrange`: run the
    Lagrangian bound and heuristic when the heuristic's plan is not proven against the LP bound
    ("chains", with `heuristic`); `probe`: the chain MIP's root node as a bound inside it (module
    docstring, (2b))."""

    name = "cvxpy-highs"

    def __init__(self, rel_gap: float = CENTRAL_REL_GAP, max_nodes: int = 32, iteration_limit: int = 100_000,
                 time_limit_s: float = 2.0, max_cached: int = 32, fast: FastPlanner | None = None,
                 search: str = "chains", max_rounds: int = 4, prove: bool = False,
                 heuristic: bool = True, lagrange: bool = True, probe: bool = True) -> None:
        if not (0 <= rel_gap < 1) or max_nodes < 1 or iteration_limit < 1 or time_limit_s <= 0:
            raise ValueError("need 0 <= rel_gap < 1, max_nodes >= 1, iteration_limit >= 1, time_limit_s > 0")
        if not 1 <= max_rounds <= C_MAX - 4:
            raise ValueError(f"need 1 <= max_rounds <= {C_MAX - 4}, got {max_rounds}")
        self.max_rounds, self.prove, self.heuristic = max_rounds, prove, heuristic
        self.targets = TargetSearch()
        self.lagrange, self.lagrange_bound, self.probe = lagrange, LagrangianBound(), probe
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        self.rel_gap, self.max_nodes, self.search = rel_gap, max_nodes, search
        self.options = {"threads": 1, "mip_rel_gap": 0.0, "mip_max_nodes": max_nodes,
                        "simplex_iteration_limit": iteration_limit, "time_limit": time_limit_s,
                        "random_seed": 0, "mip_allow_restart": False, **_NO_HEURISTICS}
        # the chain MIP keeps HiGHS's primal heuristics: its sub-MIPs (RENS, RINS) find the plans
        # the fast path misses, in the root node (measured)
        self.chain_options = {"threads": 1, "mip_rel_gap": 0.0, "mip_max_nodes": max_nodes,
                              "simplex_iteration_limit": iteration_limit, "random_seed": 0}
        self.lp_options = {"threads": 1, "presolve": "off", "simplex_iteration_limit": iteration_limit,
                           "time_limit": time_limit_s, "random_seed": 0}
        self.fast = fast or FastPlanner(warm_start=True)
        self._shapes = ShapeCache(_Compiled, max_cached)
        self.last: dict[str, int] = {}
        self.stats = dict.fromkeys(("improved", "confirmed", "kept_fast", "windows", "stopped", "out_of_time",
                                    "precertified", "tie_skipped", "lp_solves", "chain_mips", "tie_mips",
                                    "heuristic_proven", "lagrange_proven", "probes", "probe_proven"), 0)
        self._chain_models: dict[tuple[int, int], _ChainModel] = {}
        self.chain_compiles = 0
        self.deadline: float | None = None

    def set_deadline(self, at: float | None) -> None:
        """Stop HiGHS by `at` (time.perf_counter()); past it the fast plan is returned unimproved
        ("out_of_time"). The central planner sets it from the worker's budget, so that the plan
        is back before the step that needs it."""
        self.deadline = at

    @property
    def compiles(self) -> int:
        return self._shapes.compiles

    @property
    def highs_s(self) -> float:
        """HiGHS's own run time over every solve of this planner, in seconds (the rest is cvxpy
        and the fast path)."""
        return sum(m.highs_s for m in self._shapes.values()) + sum(m.highs_s for m in self._chain_models.values())

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
        """Least T, then least link bytes at that T, from incumbent `start`; True when proven
        (T within rel_gap of the optimum, violation set settled). The T search is skipped when the
        fast path's lower bound already proves `start` within rel_gap. Ties on bytes: the
        tie-break MIP when T is settled to the tie tolerance (T_RTOL), else `fastpath.reclaim`
        (greedy); with search="mip" as before: the tie-break MIP unless the T solve spent its
        budget still at `start`."""
        self.stats["windows"] += 1
        data, ds, c = window_data(inputs, window), np.array(inputs.distances), inputs.compute_per_layer_s
        L = inputs.num_layers
        start_fits = fits(inputs, window, start)
        lower = self.fast.bound(inputs, window) / c - L  # certified bound on S (T / c - L)
        t_start = step_time(inputs, ds[start].tolist()) / c  # T / c; HiGHS's gap is rel_gap of it
        if start_fits and t_start - L <= lower + self.rel_gap * t_start:
            ks, proven, bound = start, True, lower
            self.stats["precertified"] += 1
        elif self.search == "chains":
            ks, proven, bound = self._chain_search(inputs, window, data, start)
            if self.prove and not proven:
                ks_mip, proven_mip, bound_mip = self._fitting(inputs, window, data, ks)
                if ks_mip is not None:
                    if step_time(inputs, ds[ks_mip].tolist()) <= step_time(inputs, ds[ks].tolist()):
                        ks = ks_mip
                    proven, bound = proven_mip, max(bound, bound_mip)
        else:
            ks, proven, bound = self._fitting(inputs, window, data, start if start_fits else None)
            if ks is None:
                ks, proven, bound = start, False, 0.0
        bound = max(bound, lower)
        t_plan = step_time(inputs, ds[ks].tolist())
        proven = proven and violations_settled(inputs, window, c * (L + bound), t_plan)
        if self.search == "mip" and not proven and np.array_equal(ks, start):  # budget spent, nothing
            self.stats["tie_skipped"] += 1  # better: a second MIP would search again from the same incumbent
            return ks, False
        if self.search == "chains" and t_plan > c * (L + bound) * (1 + T_RTOL):  # T not settled to a tie
            link, load, e, dev, cap = self.fast._arrays(inputs, window)
            ks = reclaim(link, load, e, dev, cap, ks, tie_limit(inputs, window, t_plan) / c - L)
            return ks, proven and step_time(inputs, ds[ks].tolist()) <= c * (L + bound) * (1 + self.rel_gap)
        tie = tie_data(inputs, window, data, ds[ks].tolist())
        if tie is not None:
            self.stats["tie_mips"] += 1
            ks_tie, tie_proven, _ = self._fitting(inputs, window, tie, ks)
            if ks_tie is not None and ties_with_fewer_bytes(inputs, window, ds[ks].tolist(), ds[ks_tie].tolist()):
                ks = ks_tie
            proven = proven and tie_proven
        return ks, proven

    def _chain_search(self, inputs: PlanInputs, window: int, data: dict, start: np.ndarray
                      ) -> tuple[np.ndarray, bool, float]:
        """(placement, proven within rel_gap, lower bound on the stall): lazy chain generation.
        HiGHS solves the compact model's LP relaxation (`_Compiled.relaxation`: the lower bound and
        one weighting row); then the chain-restricted MIP (`_ChainModel`) over that row, the fast
        path's chains and the critical chain of the incumbent, from the incumbent, on a node
        budget. Its answer is scored exactly; when its critical chain is not in the model yet it
        is added and the MIP solved again, at most `max_rounds` times (an answer over capacity by
        HiGHS's feasibility tolerance is solved again with tolerances 1e-9, then with the capacity
        row's bound just under it, when the MIP's bound stops counting). Proven once the best plan's
        T is within rel_gap of the best lower bound (LP, the MIP's dual bound, or the fast path's)."""
        link, load, e, dev, cap = self.fast._arrays(inputs, window)
        L, ef, devf = inputs.num_layers, e.astype(float), dev.astype(float)

        def stall(ks: np.ndarray) -> float:
            return float(link.stall(np.bincount(ks, weights=load, minlength=len(dev))[None])[0])

        def chain_of(ks: np.ndarray) -> Chain:
            m, s, _ = link.chain(np.bincount(ks, weights=load, minlength=len(dev)))
            return m, s

        best = start if fits(inputs, window, start) else offload_greedy(link, load, e, dev, cap, start)
        model = self._chain_models.get((len(load), len(dev)))
        if model is None:  # compiled on the shape's first chain search, with the compact model's LP
            model = self._chain_models[(len(load), len(dev))] = _ChainModel(len(load), len(dev))
            self.chain_compiles += 1
        chains = list(self.fast._chains)[-(C_MAX - self.max_rounds - 2):] + [chain_of(best)]
        relaxed = self.compiled(inputs).relaxation(data, {**self.lp_options, "time_limit": self._budget_s()})
        self.stats["lp_solves"] += 1
        if relaxed is not None:
            chains.insert(0, relaxed[1])
        # the bound in our own arithmetic (not the solver's tolerances): knapsack over every row
        lower = max([0.0] + [knapsack_bound(load, ef, devf, float(cap), m)[0] - s for m, s in chains])
        if self.heuristic:  # our own primal heuristic from the LP's face (`ilp_targets`)
            target = (L + lower) * (1 + self.rel_gap) - L
            ks, _ = self.targets.search(link, load, e, dev, int(cap), best, chains,
                                        None if relaxed is None else relaxed[1],
                                        None if relaxed is None else relaxed[2], target)
            if stall(ks) < stall(best) and fits(inputs, window, ks):
                best = ks
                chains.append(chain_of(best))
                if len(chains) > C_MAX:
                    chains.pop(1 if relaxed is not None else 0)
            if self._proves(L, stall(best), lower):
                self.stats["heuristic_proven"] += 1
            elif self.lagrange:
                best, lower = self._lagrangian(link, load, e, dev, int(cap), chains, best, lower, stall,
                                               lambda ks: self._probe(inputs, window, data, model, chains, ks, stall))
                if self._proves(L, stall(best), lower):
                    self.stats["lagrange_proven"] += 1
        cap_rhs, tight = data["cap_rhs"], {}
        for _ in range(self.max_rounds):
            S = stall(best)
            if self._proves(L, S, lower) or self._time_left() <= 0:
                break
            options = {**self.chain_options, **tight, "mip_abs_gap": self._mip_abs_gap(L, S),
                       "time_limit": self._budget_s()}
            ks, status, dual = model.solve(data, chains, best, options)
            self.stats["chain_mips"] += 1
            if ks is None:
                break
            self.stats["stopped"] += status != "kOptimal"
            if data["cap_rhs"] == cap_rhs:  # a relaxation's bound (less HiGHS's tolerance), while the
                lower = max(lower, dual * (1 - 1e-9) - 1e-9)  # capacity row is the model's own
            if not fits(inputs, window, ks):  # over capacity within HiGHS's feasibility tolerance:
                # solve again with tolerances 1e-9 (slower, so not by default), then with the row's
                # bound just under that plan (exact check in `fits`; the MIP's bound no longer counts)
                if "mip_feasibility_tolerance" in options:
                    data = {**data, "cap_rhs": float(data["cap"][np.arange(len(ks)), ks].sum()) - 1e-5}
                tight = _TIGHT
                continue
            if stall(ks) < S:
                best = ks
            new = chain_of(ks)
            if any(new[1] == s2 and np.array_equal(new[0], m2) for m2, s2 in chains):
                break  # the MIP already saw its answer's critical chain: its bound is final
            chains.append(new)
            if len(chains) > C_MAX:
                chains.pop(1 if relaxed is not None else 0)
        return best, self._proves(L, stall(best), lower), lower

    def _proves(self, L: int, S: float, lower: float) -> bool:
        """Whether a plan of stall S (compute layers; T = L + S) is within rel_gap of the lower
        bound `lower` on the least stall: what proves OPTIMAL (module docstring)."""
        return L + S <= (L + lower) * (1 + self.rel_gap)

    def _mip_abs_gap(self, L: int, S: float) -> float:
        """HiGHS's absolute gap for a chain MIP from a plan of stall S: it stops at incumbent - dual
        <= this, which implies `_proves` (S - lower <= rel_gap * (L + lower)) with a margin (1e-3 of
        the gap) over the 1e-9 taken off HiGHS's dual bound."""
        return self.rel_gap * (L + S) / (1 + self.rel_gap) * (1 - 1e-3)

    def _probe(self, inputs: PlanInputs, window: int, data: dict, model: _ChainModel, chains: list[Chain],
               best: np.ndarray, stall) -> float | None:
        """The root node of the chain MIP (`_ChainModel`, from `best`; `_PROBE`: one node, no
        presolve, restarts or primal heuristics) as a bound: its dual bound (less 1e-9) when that
        proves `best` within rel_gap, else None (then nothing from it is used, so the Lagrangian
        search goes on as without the probe)."""
        L, S = inputs.num_layers, stall(best)
        options = {**self.chain_options, **_PROBE, "time_limit": self._budget_s(),
                   "mip_abs_gap": self._mip_abs_gap(L, S)}
        ks, status, dual = model.solve(data, chains, best, options)
        self.stats["probes"] += 1
        if ks is None:
            return None
        bound = dual * (1 - 1e-9) - 1e-9
        proven = self._proves(L, S, bound)
        self.stats["probe_proven"] += proven
        return bound if proven else None

    def _lagrangian(self, link, load, e, dev, cap: int, chains: list[Chain], best: np.ndarray, lower: float,
                    stall, probe) -> tuple[np.ndarray, float]:
        """(best placement, lower bound on the stall) after the Lagrangian bound (`ilp_lagrange`):
        its bound replaces `lower` when higher; each inner placement it meets is, as it is met, a
        start for the heuristic's descent (`ilp_targets`) to the target of the bound so far, whose
        plan replaces `best` when its exact stall is lower (the search then stops at the lower
        bound that proves the new plan). `probe(placement)`: `_probe` from that placement, handed
        to the search (when `self.probe`) for its first round that cannot prove the best plan."""
        L, g = link.L, self.rel_gap

        def descend(ks: np.ndarray, bound: float) -> float:  # the target the best plan proves at
            nonlocal best
            if L + stall(best) > (L + bound) * (1 + g) and int(np.asarray(dev)[ks] @ np.asarray(e)) <= cap:
                ks, _ = self.targets.search(link, load, e, dev, cap, ks, chains, None, None, (L + bound) * (1 + g) - L)
                if stall(ks) < stall(best):
                    best = ks
            return (L + stall(best)) / (1 + g) - L

        lower, _ = self.lagrange_bound.search(link, load, e, dev, cap, chains, [best], lower,
                                              (L + stall(best)) / (1 + g) - L, descend,
                                              (lambda: probe(best)) if self.probe else None)
        return best, lower

    def _budget_s(self) -> float:
        return max(1e-3, min(self.options["time_limit"], self._time_left()))

    def _time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def _fitting(self, inputs: PlanInputs, window: int, data: dict, start: np.ndarray | None
                 ) -> tuple[np.ndarray | None, bool, float]:
        compiled = self.compiled(inputs)
        # the objective is S = T / c - L: a gap of rel_gap on T is rel_gap * T / c on it
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
