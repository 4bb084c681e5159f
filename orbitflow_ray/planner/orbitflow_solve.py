"""OrbitFlow's solve/pause loop: one batch's placement plan, judged as the engine runs it, and its pauses.

In: the batch as `RequestView`s, the device's `CapacityView` and the ids that may not be paused
(`pinned`). Out: a `problem.Plan` (a prefetch distance per request, its window, predicted step and
the requests it predicts late) with the ids paused to reach it; `solve_for` wraps the pair in a
`planning.PlanResult` for the central planner. The loop owns the solver and counts its own events
in the policy's counters ("fallbacks", "infeasible", "engine_single", "engine_slower" and Pause-for-
SLO's); it keeps no plan: the policy passes the plan in force to `held`.

- The problem (`inputs`): the batch's context lengths, tokens left, SLOs less its prefill debt
  and the arrivals' prefill load, Token-Deposit credit (`admission.batch_plan_inputs`), on the
  online cost model.
- The solve (`solve`): the solver (`solvers.py`: "fast" on a worker, "cvxpy-highs" centrally); its
  plan judged as the engine runs it (`engine_checked`, `link_model` "engine": the solvers model an
  EDF link, the engine issues its copies for the union of the batch's host layers, in order; a
  plan mixing distances is weighed, as the engine runs both, against the best single-distance
  plan, which is taken where it is better: fewer late, else a shorter step, else fewer bytes).
- Pause-Resume: while no placement fits (INFEASIBLE, `problem.py`), pause one unpinned request
  (`pause_strategy`, largest by default: the paper's choice, `pause.py`) and re-solve; the set reached
  that way is the fewest pauses that make the batch feasible. A feasible plan that misses the SLOs of
  requests still able to meet all theirs goes to Pause-for-SLO (`pause.SloPauseSearch`, at most
  `slo_pause_max_trials` trial solves; `pause_cost` says what a pause costs its request). No pause
  with `can_pause` False (`orbitflow-no-pause`): an infeasible batch gets the fallback.
- The fallback (`fallback`): every request at its largest offload short of all-host; a solver error
  falls back too, logged and counted; no request is ever dropped.
- The plan in force, held (`held`, `holds_better`): at a window's end, on drift and when the batch
  changed (not for capacity, nor a finish) the policy may keep it (`OrbitFlow.placement_hold`); its
  distances re-judged at the batch's contexts now, shrunk a distance class at a time where the
  batch outgrew the device (`shrunk`), and weighed against the new solve by the late gaps each
  predicts over its window (`late_gaps`), the new plan's first step carrying the KV it moves
  (`moved_bytes`).

Sources: the OrbitFlow paper's per-request, per-layer distance-driven placement ILP (`problem.py`)
and its Pause-Resume, the largest request paused first (`pause.py`). Ablations of what this module
adds: `orbitflow-edf-link` (no engine-judged check), `orbitflow-no-hold` (no hold),
`orbitflow-no-pause` (no pauses at all).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace
from functools import partial
from typing import Callable

from orbitflow_ray.costmodel import OnlineCostModel
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner.admission import batch_plan_inputs, ttft_missed_ids
from orbitflow_ray.planner.base import CapacityView, RequestView
from orbitflow_ray.planner.pause import PauseStrategy, SloPauseSearch, pause_breaks_tpot
from orbitflow_ray.planner.planning import PlanResult
from orbitflow_ray.planner.problem import (Plan, PlanInputs, PlanStatus, device_bytes, distance_set,
                                           engine_step_time, fit_whole_plan, late_requests, make_plan,
                                           placement_for_distance, plan_better, step_time)
from orbitflow_ray.planner.solvers import PlacementSolver, make_solver

log = logging.getLogger(__name__)
PAUSE_COSTS = ("slack", "miss")  # `OrbitFlow.pause_cost`
LINK_MODELS = ("engine", "edf")  # `OrbitFlow.link_model`


def distance_of(placement: tuple[Tier, ...] | None, num_layers: int, distances: tuple[int, ...]) -> int | None:
    """The distance whose placement this is (None: no placement, or none of `distances` makes it)."""
    if placement is None:
        return None
    host = [t == Tier.HOST for t in placement]
    return next((d for d in distances if placement_for_distance(d, num_layers) == host), None)


class SolveLoop:
    """The solve/pause loop of one OrbitFlow policy (see the module docstring).

    `cost` is the policy's online cost model (shared: its refits show here); `counters` the
    policy's counter dict, which the loop and its Pause-for-SLO searches add to; `seed` draws the
    `random` pause strategy's victims (the lifetime peak's probe search draws from its own)."""

    def __init__(self, num_layers: int, cost: OnlineCostModel, default_slo_s: float, windows: tuple[int, ...],
                 distances: tuple[int, ...] | None, solver: PlacementSolver, counters: dict[str, int],
                 pick_victim: PauseStrategy, seed: int, slo_pause_max_trials: int, uses_deposit: bool,
                 can_pause: bool, link_model: str, prefetch_depth: int, pause_cost: str) -> None:
        self.num_layers, self.cost, self.default_slo_s = num_layers, cost, default_slo_s
        self.windows, self.distances = windows, distances
        self.solver = solver
        self._single = make_solver("uniform")  # the single-distance candidate of `engine_checked`
        self.counters = counters
        self.pick_victim = pick_victim
        self.rng = random.Random(seed)
        self.uses_deposit, self.can_pause = uses_deposit, can_pause
        self.link_model, self.prefetch_depth, self.pause_cost = link_model, prefetch_depth, pause_cost
        self.slo_pause = SloPauseSearch(pick_victim, self.rng, counters, slo_pause_max_trials)
        # the solver's searches (main solves and Pause-for-SLO trials), and the `solve` calls that ran
        # at least one (the others settled with `fit_whole_plan`): what the simulator charges for
        self.searches = self.solves_searched = 0
        # the arrivals' prefill load the SLOs are planned against (`KVPolicy.prefill_load`; the
        # policy sets it: it owns the arrival forecast); 0 until then
        self.prefill_load: Callable[[], float] = lambda: 0.0
        # the lifetime peak's own search (a probe: its counters and draws are not the policy's)
        self.peak_pause = SloPauseSearch(pick_victim, random.Random(seed), {}, slo_pause_max_trials)

    # ---- the problem ---------------------------------------------------------------------------
    def inputs(self, views: list[RequestView], cap: CapacityView) -> PlanInputs:
        """The batch's problem, prefill debt and the arrivals' prefill load taken off the SLOs
        (`admission.batch_plan_inputs`)."""
        return batch_plan_inputs(views, cap, self.num_layers, self.cost, self.default_slo_s, self.windows,
                                 self.distances, deposit=self.uses_deposit, prefill_load=self.prefill_load())

    def judged_step_s(self, inputs: PlanInputs, distances: list[int]) -> float:
        """The step time plans are judged by (`link_model`)."""
        if self.link_model == "engine":
            return engine_step_time(inputs, distances, self.prefetch_depth)
        return step_time(inputs, distances)

    # ---- the solve -----------------------------------------------------------------------------
    def solve(self, views: list[RequestView], cap: CapacityView, pinned: frozenset[str],
              probe: bool = False, costs: Callable[[RequestView], bool] | None = None
              ) -> tuple[Plan, list[str]]:
        """Solve; while infeasible, pause one unpinned request and re-solve. Returns the plan and
        the ids paused to reach it. A probe (may this request join?) logs and counts nothing, and
        pauses for the SLO only given `costs` (which pauses cost their request an SLO)."""
        searches = self.searches
        try:
            return self._solve(views, cap, pinned, probe, costs)
        finally:
            self.solves_searched += self.searches > searches

    def _placement(self, inputs: PlanInputs) -> Plan:
        """The solver's plan, or with no search when the batch fits on device whole
        (`problem.fit_whole_plan`, counted in "plans_fit_whole")."""
        plan = fit_whole_plan(inputs, self.solver.name)
        if plan is not None:
            self.counters["plans_fit_whole"] += 1
            return plan
        self.searches += 1
        return self.solver.solve(inputs)

    def _solve(self, views: list[RequestView], cap: CapacityView, pinned: frozenset[str], probe: bool,
               costs: Callable[[RequestView], bool] | None) -> tuple[Plan, list[str]]:
        active, paused = list(views), []
        while True:
            inputs = self.inputs(active, cap)
            try:
                plan = self.engine_checked(self._placement(inputs), inputs)
            except Exception:  # a solver bug or timeout must not stop serving
                log.exception("placement solve failed; falling back to the largest offload")
                self.counters["fallbacks"] += 1
                return self.fallback(inputs, PlanStatus.FALLBACK_ERROR), paused
            if plan.status != PlanStatus.INFEASIBLE:
                return self._pause_for_slo(plan, active, cap, pinned, paused, probe, costs)
            victims = [v for v in active if v.request_id not in pinned]
            if probe:
                if not self.can_pause or not victims:
                    return self.fallback(inputs, PlanStatus.FALLBACK_INFEASIBLE), paused
            else:
                self.counters["infeasible"] += 1
                if not self.can_pause or not victims:
                    log.warning("no placement fits %d requests in %d device bytes; largest-offload "
                                "fallback", len(active), inputs.device_capacity_bytes)
                    self.counters["fallbacks"] += 1
                    return self.fallback(inputs, PlanStatus.FALLBACK_INFEASIBLE), paused
            victim = self.pick_victim(victims, self.rng)
            active = [v for v in active if v.request_id != victim]
            paused.append(victim)

    def solve_for(self, views: list[RequestView], cap: CapacityView, pinned: frozenset[str] = frozenset(),
                  deadline: float | None = None) -> PlanResult:
        """One planning solve on another's behalf (the central planner solving for a worker),
        warm-started from the placements the worker's views carry (its plan in force); `deadline`
        (time.perf_counter()) bounds a wall-clock solver (`PlanningPolicy`)."""
        ds = distance_set(self.distances, self.num_layers)
        self.solver.seed({v.request_id: d for v in views
                          if (d := distance_of(v.placement, self.num_layers, ds)) is not None})
        self.solver.set_deadline(deadline)
        try:
            plan, paused = self.solve(list(views), cap, frozenset(pinned))
        finally:
            self.solver.set_deadline(None)
        return PlanResult(plan, tuple(paused))

    def engine_checked(self, plan: Plan, inputs: PlanInputs) -> Plan:
        """The solver's plan judged as the engine runs it (`link_model` "engine"): its T at
        `problem.engine_step_time`, and its violations at that step time at the window's end (every
        request `growth(window)` tokens longer: the largest step of the window, since T grows with
        the contexts, where the solvers judge its first). The solvers model an EDF link, which
        gives a long-distance request of a batch mixing distances a longer window than the
        engine's copies (issued for the union of the batch's host layers, in order) do: a plan
        mixing distances is weighed against the best single-distance plan (where the two link
        models agree), both as the engine runs them (`problem.plan_better`: fewer late, a shorter
        step beyond T_RTOL, fewer link bytes), and the better is taken ("engine_single" counts the
        single-distance plans taken; "engine_slower" the mixed plans kept that the engine makes miss
        more than the solver predicted). Unchanged with the "edf" link model and for a plan of one
        distance."""
        if self.link_model != "engine" or plan.status is PlanStatus.INFEASIBLE or not plan.distances:
            return plan
        judged = partial(self.engine_judged, inputs=inputs)
        checked = judged(plan)
        if len(set(plan.distances.values())) > 1:
            alt = self._single.solve(inputs)
            if alt.status is not PlanStatus.INFEASIBLE:
                alt = judged(alt)
                if plan_better(inputs, alt, checked):
                    self.counters["engine_single"] += 1
                    self.solver.seed(alt.distances)
                    return alt
        if len(checked.violations) > len(plan.violations):
            self.counters["engine_slower"] += 1
        return checked

    def engine_judged(self, plan: Plan, inputs: PlanInputs) -> Plan:
        """`plan` with its T at `problem.engine_step_time` and its violations at that step at the
        window's end (every request `growth(window)` tokens longer)."""
        ds = [plan.distances[r.request_id] for r in inputs.requests]
        T = engine_step_time(inputs, ds, self.prefetch_depth)
        late = late_requests(inputs, engine_step_time(inputs, ds, self.prefetch_depth, plan.window), plan.window)
        return replace(plan, predicted_step_s=T, violations=late)

    def _pause_for_slo(self, plan: Plan, active: list[RequestView], cap: CapacityView, pinned: frozenset[str],
                       paused: list[str], probe: bool, costs: Callable[[RequestView], bool] | None = None
                       ) -> tuple[Plan, list[str]]:
        """Pause-Resume under a slow link (`pause.SloPauseSearch`); not for `-no-pause`, nor for
        probes without `costs`. With `pause_cost` "slack", at run time a pause costs its request
        a miss only when waiting until the rest of the batch next shrinks (its earliest finish, at
        steps on time) outruns its TPOT slack at the batch's compute-only step."""
        if not self.can_pause or (probe and costs is None):
            return plan, paused
        if costs is None and self.pause_cost == "slack":
            step = self.num_layers * self.inputs(active, cap).compute_per_layer_s

            def costs(v: RequestView) -> bool:
                rest = [u.max_new_tokens_left for u in active if u.request_id != v.request_id]
                return pause_breaks_tpot(v.max_new_tokens_left, min(rest, default=0), step,
                                         v.slo_s or self.default_slo_s)
        search = self.peak_pause if probe else self.slo_pause
        best, extra = search.search(plan, active, pinned, lambda views: self.inputs(views, cap),
                                    lambda inputs: self.engine_checked(self._placement(inputs), inputs),
                                    self.solver.seed, costs)
        return best, paused + extra

    def fallback(self, inputs: PlanInputs, status: PlanStatus) -> Plan:
        """Every request at its largest offload short of all-host, all-host where only that holds
        it (`PlanInputs.largest_offload`); the scheduler's preemption covers what does not fit."""
        choice = inputs.largest_offload()
        return make_plan(inputs, choice, step_time(inputs, choice), inputs.windows[0],
                         status, time.perf_counter(), status.value)

    # ---- the plan in force, held ---------------------------------------------------------------
    def held(self, plan: Plan | None, views: list[RequestView], cap: CapacityView) -> Plan | None:
        """The plan in force (`plan`) as it would run another window (`placement_hold`): its
        distances re-judged at the batch's contexts now, per window, longest first; where they do
        not fit the device at a window's end, shrunk (`shrunk`: device -> host, the fewest copies).
        The first window predicting no miss for a request still able to meet all its SLOs, else the
        one predicting the fewest (the caller then solves and weighs, `holds_better`); None when
        none fits, or the plan in force is a fallback or not this batch's. A new placement moves
        KV: its copies land in one step (device -> host waited for before it computes), which
        then runs late for every request of the batch, while a request meets TBT with at most
        1 % of its gaps late."""
        if plan is None or plan.status.is_fallback or not all(v.request_id in plan.distances for v in views):
            return None
        inputs, missed = self.inputs(views, cap), ttft_missed_ids(views)
        now = [plan.distances[v.request_id] for v in views]
        best = None
        for w in sorted(inputs.windows, reverse=True):
            ds = now
            if device_bytes(inputs, ds, w) > inputs.device_capacity_bytes:
                ds = self.shrunk(inputs, ds, w)  # the batch outgrew its placement: offload the least
                if ds is None:
                    continue
            held = make_plan(inputs, ds, self.judged_step_s(inputs, ds), w, plan.status, time.perf_counter(),
                             plan.solver)
            if self.link_model == "engine":
                held = self.engine_judged(held, inputs)
            if not held.violations - missed:
                return held
            if best is None or len(held.violations - missed) < len(best.violations - missed):
                best = held
        return best

    def holds_better(self, held: Plan, solved: tuple[Plan, list[str]], views: list[RequestView],
                     cap: CapacityView, missed: set[str]) -> bool:
        """Whether the plan in force (`held`, its distances re-judged) beats the new solve. With
        pauses in the solve, by misses (violations plus pauses). Otherwise by the late gaps each
        predicts over its window for the requests still able to meet all their SLOs
        (`late_gaps`), the new plan's first step carrying the KV it moves (`moved_bytes`),
        which makes that step late for the whole batch when the copies push it past the SLO."""
        plan, paused = solved
        if paused:
            return len(held.violations - missed) <= len(plan.violations - missed) + len(set(paused) - missed)
        inputs = self.inputs(views, cap)
        moved = self.moved_bytes(inputs, held.distances, plan.distances)
        return self.late_gaps(held, inputs, missed) <= self.late_gaps(plan, inputs, missed, moved)

    def late_gaps(self, plan: Plan, inputs: PlanInputs, missed: set[str], moved_bytes: int = 0) -> int:
        """Late gaps `plan` predicts over its window for the requests of `inputs` not in `missed`:
        its step grows from T (now) to T at the window's end about linearly, so a request whose
        effective SLO lies between is late for the window's tail past that crossing; the first
        step, carrying `moved_bytes` of copies on the link, is late where they push it over."""
        ds = [plan.distances[r.request_id] for r in inputs.requests]
        W, T0 = plan.window, self.judged_step_s(inputs, ds)
        end = replace(inputs, requests=tuple(replace(r, context_tokens=r.context_tokens + r.growth(W))
                                             for r in inputs.requests))
        T1 = self.judged_step_s(end, ds)
        first = T0 + moved_bytes / inputs.link_bytes_per_s
        gaps = 0
        for r in inputs.requests:
            if r.request_id in missed:
                continue
            slo = r.effective_slo_s(W)
            late = 0 if T1 <= slo else W if T0 > slo else W - int((slo - T0) / (T1 - T0) * W)
            gaps += late + (late < W and first > r.slo_s)
        return gaps

    @staticmethod
    def moved_bytes(inputs: PlanInputs, old: dict[str, int], new: dict[str, int]) -> int:
        """KV bytes re-placing the batch from distances `old` to `new` copies (either way)."""
        L, bs, total = inputs.num_layers, inputs.block_size, 0
        for r in inputs.requests:
            a, b = placement_for_distance(old[r.request_id], L), placement_for_distance(new[r.request_id], L)
            total += sum(x != y for x, y in zip(a, b)) * -(-r.context_tokens // bs) * bs
        return total * inputs.kv_bytes_per_token_per_layer

    def shrunk(self, inputs: PlanInputs, ds: list[int], window: int) -> list[int] | None:
        """`ds` with requests moved down a distance class (more layers on host), one class of one
        request at a time, never below its largest offload (`PlanInputs.largest_offload`: all-host
        only for a request nothing else holds, as the solvers allow), until the batch fits the
        device at `window`'s end; each time the request whose move gives the shortest first step:
        the judged step plus the copies from `ds` on the link (distance classes are not nested: a
        class down can bring layers back as well as send others out). None if it never fits: the
        solve then pauses (Pause-Resume)."""
        start, ids = list(ds), [r.request_id for r in inputs.requests]
        ds, classes, bw = list(ds), inputs.distances, inputs.link_bytes_per_s
        old, floor = dict(zip(ids, start)), inputs.largest_offload()
        while device_bytes(inputs, ds, window) > inputs.device_capacity_bytes:
            best = None
            for i, d in enumerate(ds):
                k = classes.index(d) if d in classes else 0
                if k == 0 or classes[k - 1] < floor[i]:
                    continue
                trial = ds[:i] + [classes[k - 1]] + ds[i + 1:]
                key = self.judged_step_s(inputs, trial) + self.moved_bytes(inputs, old, dict(zip(ids, trial))) / bw
                if best is None or key < best[0]:
                    best = (key, trial)
            if best is None:
                return None
            ds = best[1]
        return ds
