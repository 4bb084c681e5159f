"""The placement MIP built with highspy directly: the same model as `ilp.py`, no cvxpy in between.

The matrix is laid out once per (requests, layers, distances, copies cost compute) shape; a solve writes the
parameter-dependent coefficients (link loads, capacity shares, big-Ms, SLO slacks) into their
fixed slots, hands the arrays to HiGHS in one `passModel` call and seeds it with an incumbent
(the caller's previous plan, mapped by request id, when it is still feasible).

Columns: x[r, k] (binary, row-major), then v[r] (binary, only with `violations=True`), Y[k], U[j].
Rows: one-of-K per request; Y definitions; capacity; U monotone; link intervals; SLO big-M.
Where copies cost compute (`PlanInputs.copy_ratio` > 0, a layout of its own), one more column
U[L] = U[L-1] + lin . Y (`problem.step_time`'s copy term: a link row on a virtual layer past the
last, with no compute in it); then U[L] is what the objective, the caps and the big-M rows read.

`violations=False` drops v and the big-M rows and minimises L + U[last] = T / c alone (so HiGHS's
relative gap is a gap on T). That is exact for the lexicographic objective, not a relaxation: for
a fixed window every request sees the same T, so the set of late requests {r : T > effective_slo_r}
only grows with T and the least-T plan also has the fewest violations (`problem.py`); with a
nonzero gap the violation set is proven only if no effective SLO lies inside it (else FEASIBLE).
`violations=True` is the reference model of `ilp.py`, for the cvxpy-vs-direct comparison.

Ties on T are broken as in `ilp.py`: a second solve on the same layout, least link bytes with
U[last] capped at the tie limit (`problem.tie_data`), seeded with the first solve's plan.
"""

from __future__ import annotations

import highspy
import numpy as np

from orbitflow_ray.planner.problem import (Plan, PlanInputs, critical_intervals, fits, search_windows,
                                           step_time, tie_data, ties_with_fewer_bytes,
                                           violations_settled, window_counts, window_data)

INF = highspy.kHighsInf


class _Layout:
    """Sparse structure of one shape; `model` returns passModel's arguments for one window."""

    def __init__(self, R: int, L: int, distances: tuple[int, ...], violations: bool, copy: bool = False) -> None:
        K = len(distances)
        pairs, counts = critical_intervals(L, distances)
        nv, nu = (R if violations else 0), L + copy
        self.R, self.K, self.L, self.nv, self.distances, self.copy = R, K, L, nv, distances, copy
        xc = np.arange(R * K).reshape(R, K)
        yc, uc = R * K + nv + np.arange(K), R * K + nv + K + np.arange(nu)
        self.ncol = R * K + nv + K + nu
        rows, cols, vals, lo, hi = [], [], [], [], []

        def add(r, c, v):
            rows.append(np.broadcast_to(r, np.shape(c)).ravel())
            cols.append(np.ravel(c))
            vals.append(np.broadcast_to(np.asarray(v, float), np.shape(c)).ravel())

        row = 0
        add(np.repeat(np.arange(R), K), xc.ravel(), 1.0)  # one distance per request
        lo += [1.0] * R; hi += [1.0] * R; row += R
        self.load_at = sum(map(len, rows))
        add(row + np.tile(np.arange(K), R), xc.ravel(), 0.0)  # -load[r] * x[r, k] + Y[k] = 0
        add(row + np.arange(K), yc, 1.0)
        lo += [0.0] * K; hi += [0.0] * K; row += K
        self.cap_at = sum(map(len, rows))
        add(row, xc.ravel(), 0.0)  # capacity share
        self.cap_row = row
        lo.append(-INF); hi.append(1.0); row += 1
        add(row + np.arange(nu - 1), uc[1:], 1.0)  # U monotone
        add(row + np.arange(nu - 1), uc[:-1], -1.0)
        lo += [0.0] * (nu - 1); hi += [INF] * (nu - 1); row += nu - 1
        for i, (a, b) in enumerate(pairs):  # link: count . Y - U[b] + U[a-1] <= b - a
            nz = np.flatnonzero(counts[i])
            add(row + i, yc[nz], counts[i, nz])
            add(row + i, [uc[b]] + ([uc[a - 1]] if a >= 1 else []), [-1.0] + ([1.0] if a >= 1 else []))
        lo += [-INF] * len(pairs); hi += list((pairs[:, 1] - pairs[:, 0]).astype(float)); row += len(pairs)
        if copy:  # the copies' compute: lin . Y - U[L] + U[L-1] <= 0 (lin written per solve)
            self.lin_at = sum(map(len, rows))
            add(row, yc, 0.0)
            add(row, [uc[L], uc[L - 1]], [-1.0, 1.0])
            lo.append(-INF); hi.append(0.0); row += 1
        self.u_last = uc[nu - 1]
        if violations:  # U[last] - M[r] v[r] <= slack[r]
            self.slo_row = row
            add(row + np.arange(R), np.full(R, self.u_last), 1.0)
            self.bigm_at = sum(map(len, rows))
            add(row + np.arange(R), R * K + np.arange(R), 0.0)
            lo += [-INF] * R; hi += [0.0] * R; row += R
        self.nrow = row
        r_, c_, v_ = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        self.order = np.lexsort((r_, c_))  # column-major
        self.index = r_[self.order].astype(np.int32)
        self.start = np.searchsorted(c_[self.order], np.arange(self.ncol + 1)).astype(np.int32)
        self.base = v_
        self.row_lower, self.row_upper = np.array(lo), np.array(hi)
        self.col_lower = np.zeros(self.ncol)
        self.col_upper = np.r_[np.ones(R * K + nv), np.full(K + nu, INF)]
        self.integrality = np.r_[np.ones(R * K + nv), np.zeros(K + nu)].astype(np.int32)

    def incumbent(self, data: dict, ks: np.ndarray) -> highspy.HighsSolution:
        """A full feasible point for a placement: x, v, Y and the least stalls U."""
        R, K, L = self.R, self.K, self.L
        x = np.zeros((R, K))
        x[np.arange(R), ks] = 1.0
        Y = data["load"] @ x
        counts = window_counts(L, self.distances)
        need = counts @ Y - (np.arange(L)[None, :] - np.arange(L)[:, None])
        U = np.zeros(L + 1)
        for b in range(L):
            U[b + 1] = max(U[b], float(np.max(U[:b + 1] + need[:b + 1, b])))
        if self.copy:
            U = np.r_[U, U[L] + float(data["lin"] @ Y)]
        v = (U[-1] > data["slack"]).astype(float) if self.nv else np.zeros(0)
        sol = highspy.HighsSolution()
        sol.col_value = np.r_[x.ravel(), v, Y, U[1:]].tolist()
        sol.value_valid = True
        return sol

    def model(self, data: dict) -> tuple:
        R, K = self.R, self.K
        v = self.base.copy()
        v[self.load_at:self.load_at + R * K] = -np.repeat(data["load"], K)
        v[self.cap_at:self.cap_at + R * K] = data["cap"].ravel()
        if self.copy:
            v[self.lin_at:self.lin_at + K] = data["lin"]
        cost, col_upper = np.zeros(self.ncol), self.col_upper.copy()
        cost[:R * K] = data["hostload"].ravel()  # zero but in the tie-break solve
        cost[self.u_last], col_upper[self.u_last] = data["ucoef"], data["u_cap"]
        row_upper = self.row_upper.copy()
        row_upper[self.cap_row] = data["cap_rhs"]
        if self.nv:
            v[self.bigm_at:self.bigm_at + R] = -data["bigm"]
            cost[R * K:R * K + R] = data["weight"]
            col_upper[R * K:R * K + R] = data["v_ub"]
            row_upper[self.slo_row:self.slo_row + R] = data["slack"]
        # reduced: objective = T / c, so mip_rel_gap is on T
        offset = 0.0 if self.nv else float(self.L) * data["ucoef"]
        return (self.ncol, self.nrow, len(v), 1, 1, offset, cost, self.col_lower, col_upper,
                self.row_lower, row_upper, self.start, self.index, v[self.order], self.integrality)


class HighsPlanner:
    """Plans with highspy directly. `violations=False` is the reduced model (module docstring).
    `rel_gap`: stop once T is proven within this factor of the optimum (1e-4 = HiGHS's default).
    `warm_start`: seed HiGHS with the previous plan (by request id) when it still fits."""

    def __init__(self, violations: bool = True, rel_gap: float = 1e-4, time_limit_s: float = 2.0,
                 warm_start: bool = True) -> None:
        self.violations, self.rel_gap, self.warm_start = violations, rel_gap, warm_start
        self.name = "highspy" if violations else "highspy-reduced"
        self._layouts: dict[tuple, _Layout] = {}
        self._options = {"output_flag": False, "threads": 1, "time_limit": time_limit_s,
                         "mip_rel_gap": 0.0 if violations else rel_gap}
        self._h: highspy.Highs | None = None
        self.last: dict[str, int] = {}

    @property
    def _highs(self) -> highspy.Highs:
        """Created on first use: HiGHS prints a banner on construction, and the fast path
        usually never needs it."""
        if self._h is None:
            self._h = highspy.Highs()
            for k, v in self._options.items():
                self._h.setOptionValue(k, v)
        return self._h

    def layout(self, inputs: PlanInputs) -> _Layout:
        key = (len(inputs.requests), inputs.num_layers, inputs.distances, inputs.copy_ratio > 0)
        if key not in self._layouts:
            self._layouts[key] = _Layout(*key[:3], self.violations, key[3])
        return self._layouts[key]

    def solve_window(self, inputs: PlanInputs, window: int,
                     start: np.ndarray | None = None) -> tuple[np.ndarray, bool, float]:
        """(class index per request, proven within rel_gap, lower bound on T / c or 0): least
        (violations and) T, then least link bytes at that T (module docstring)."""
        lay, data = self.layout(inputs), window_data(inputs, window)
        ks, proven, bound = self._run(inputs, window, lay, data, start)
        ds = np.array(inputs.distances)
        tie = tie_data(inputs, window, data, ds[ks].tolist())
        if tie is not None:
            # HiGHS 1.16 presolve can misvalue a start whose whole cost is on columns it removes
            # ("feasible in the reduced space: objective value is 0") and stop there as optimal
            ks_tie, tie_proven, _ = self._run(inputs, window, lay, tie, ks, presolve="off")
            if ties_with_fewer_bytes(inputs, window, ds[ks].tolist(), ds[ks_tie].tolist()):
                ks = ks_tie
            proven = proven and tie_proven
        return ks, proven, bound

    def _run(self, inputs: PlanInputs, window: int, lay: _Layout, data: dict, start: np.ndarray | None,
             presolve: str = "choose") -> tuple[np.ndarray, bool, float]:
        ok = (highspy.HighsModelStatus.kOptimal, highspy.HighsModelStatus.kTimeLimit)
        for _ in range(3):  # HiGHS may overshoot the capacity row by its feasibility tolerance:
            # then re-solve with the row's bound just under that plan (exact check in `fits`)
            h, status = self._attempt(inputs, window, lay, data, start, presolve)
            if status not in ok:
                # A reused HiGHS instance occasionally reports a solve error that a fresh one does not
                # (seen under CPU load): retry once from scratch, without the warm start.
                self._h = None
                h, status = self._attempt(inputs, window, lay, data, None, presolve)
            if status not in ok:
                raise RuntimeError(f"HiGHS: {h.modelStatusToString(status)} on a feasible window")
            x = np.asarray(h.getSolution().col_value[:lay.R * lay.K]).reshape(lay.R, lay.K)
            ks = np.argmax(x, axis=1)
            if fits(inputs, window, ks):
                bound = 0.0 if self.violations else h.getInfo().mip_dual_bound
                return ks, status == highspy.HighsModelStatus.kOptimal, bound
            # just under that plan, past HiGHS's mip_feasibility_tolerance (1e-6)
            data["cap_rhs"] = float(data["cap"][np.arange(lay.R), ks].sum()) - 1e-5
        raise RuntimeError("HiGHS kept returning plans over capacity")

    def _attempt(self, inputs: PlanInputs, window: int, lay: _Layout, data: dict, start: np.ndarray | None,
                 presolve: str):
        """One HiGHS run of the window's model, warm-started from `start` when it fits."""
        h = self._highs
        h.setOptionValue("mip_abs_gap", self.rel_gap * inputs.num_layers)
        h.setOptionValue("presolve", presolve)
        h.passModel(*lay.model(data))
        if start is not None and fits(inputs, window, start):
            h.setSolution(lay.incumbent(data, start))
        h.run()
        return h, h.getModelStatus()

    def solve(self, inputs: PlanInputs) -> Plan:
        ds, c = np.array(inputs.distances), inputs.compute_per_layer_s

        def solve_at(window: int) -> tuple[list[int], bool]:
            ks, proven, bound = self.solve_window(inputs, window, self._start(inputs))
            choice = ds[ks].tolist()
            if not self.violations:
                proven = proven and violations_settled(inputs, window, c * bound, step_time(inputs, choice))
            return choice, proven

        plan = search_windows(inputs, solve_at, self.name)
        self.last = plan.distances
        return plan

    def _start(self, inputs: PlanInputs) -> np.ndarray | None:
        """The previous plan by request id, new requests at `PlanInputs.largest_offload` (used if
        it fits)."""
        if not self.warm_start or not self.last:
            return None
        index = {d: k for k, d in enumerate(inputs.distances)}
        return np.array([index.get(min(self.last.get(r.request_id, -1), inputs.num_layers), index[d])
                         for r, d in zip(inputs.requests, inputs.largest_offload())])
