"""The OrbitFlow policy: SLO-aware per-request, per-layer KV placement, refined at run time.

Each planning event builds a `PlanInputs` from the running batch (context lengths, tokens left,
SLOs, Token-Deposit credit) and the online cost model, and solves it with the solver named by
`solver` (`solvers.py`): on a worker "fast" (`FastPlanner`, a certified heuristic with counted,
deterministic budgets); on the central planner "cvxpy-highs" (the fast plan improved by the
compact ILP in cvxpy + HiGHS, never worse than it). `problem.py` has the model. A plan holds for
its window of W decode steps; it is re-solved when

- the batch changes (admission, finish, pause, resume)      -> on the spot
- the window runs out                                        -> solved ahead (central)
- measured step time drifts from the prediction              -> solved one step ahead (central)
  (locally a window's end is solved one step ahead; centrally as many as the round trip needs)
  unless the plan in force holds (`placement_hold`, `_held`): at the longest window whose end its
  distances fit (shrunk when the batch outgrew them: one request a distance class down at a time,
  the one whose step plus copies is shortest) and predict no miss for a request still able to meet
  all its SLOs, it is kept without a solve; a solve is adopted over it only when it predicts fewer
  late gaps over its window (`_late_gaps`, its first step carrying its copies) or it pauses to miss
  less. A re-placement's copies land in one step, which then runs late for every request of the
  batch, and TBT allows 1 % of a request's gaps late (`orbitflow-no-hold` is the ablation)
- the next step's growth does not fit the free device blocks -> on the spot

Each plan is judged as the engine runs it (`link_model` "engine", `_engine_checked`): its step at
`problem.engine_step_time` and its misses at that step at the window's end; where the engine's copy
order makes a mixed-distance plan miss more, the best single-distance plan is taken if it misses
fewer. Admission (`slo`) also weighs the batch's KV peak over its lifetime (`admission_horizon`
"lifetime", `lifetime_misses`), and breaks a tie on goodput misses on everyone's late steps
(`everyone_breaks_ties`; `orbitflow-ties-join` is the ablation).

When the batch does not fit without streaming all-host some request that could keep layers on
device (INFEASIBLE, `problem.py`), Pause-Resume pauses one request (strategy: largest by
default), re-solves, and repeats; paused requests keep all their KV on host and rejoin, oldest
first, when the ILP admits them again. Pauses are decided by that loop around the solver, not
inside the ILP: the set it reaches pausing largest first is the fewest pauses that make the
batch feasible (feasibility depends on each request's largest-offload KV alone). A feasible plan
that misses the SLOs of requests still able to meet all theirs pauses too, when pausing leaves
fewer misses than it costs (`pause.SloPauseSearch`: a slow link pauses, as no-offload preempts; at most
`slo_pause_max_trials` trial solves per re-plan, SLO_PAUSE_MAX_TRIALS by default). A pause costs
its request a miss only when its wait (until the rest of the batch next shrinks) outruns its TPOT
slack with `pause_cost` "slack" (`pause.pause_breaks_tpot`, `orbitflow-pause-slack`; then the
lifetime admission's peak probe pauses for the SLO too); by default ("miss") always one. On the central
planner the loop runs with the ILP solver, so a central plan carries its own pause decisions.
Solving ahead, a worker with a central planner sends the batch predicted at the window's end
there, as many steps ahead as the measured round trip needs (`planner/ahead.py`), and adopts the
answer if it is back, for that batch, by the step that needs it; otherwise it solves on the spot
with the fast path. A request paused longer than `max_pause_s` is pinned: the
solve pauses others instead, so nobody starves. A solver error falls back to a safe heuristic
(every request at its largest offload short of all-host, all-host where only that holds it),
logged and counted; no request is ever dropped.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import replace
from functools import partial
from typing import Callable

from orbitflow_ray.costmodel import CostModel, OnlineCostModel
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner.admission import (AdmissionKind, SloAdmission, bank_wait_s, batch_plan_inputs,
                                             lifetime_peak, outgrow_wait, prefill_debt_s, prefill_stalls_s,
                                             ttft_at_stake, ttft_missed_ids)
from orbitflow_ray.planner.ahead import AheadSolver
from orbitflow_ray.planner.base import (CapacityView, KVPolicy, PlacementPlan, RequestView,
                                        StepStats, register_policy)
from orbitflow_ray.planner.deposit import ArrivalForecast, bank_target
from orbitflow_ray.planner.pause import SLO_PAUSE_MAX_TRIALS, SloPauseSearch, pause_breaks_tpot, pause_strategy
from orbitflow_ray.planner.planning import PlanResult, RemoteSolve
from orbitflow_ray.planner.problem import (ALL_HOST, DEFAULT_WINDOWS, Plan, PlanInputs, PlanStatus,
                                           certain_late, device_bytes, distance_set, engine_step_time, late_requests, make_plan,
                                           placement_for_distance, step_time)
from orbitflow_ray.planner.solvers import PlacementSolver, make_solver

log = logging.getLogger(__name__)
ADMISSION_HORIZONS = ("lifetime", "window")  # `OrbitFlow.admission_horizon`
PAUSE_COSTS = ("slack", "miss")  # `OrbitFlow.pause_cost`
LINK_MODELS = ("engine", "edf")  # `OrbitFlow.link_model`

def tiers_for_distance(d: int, num_layers: int) -> list[Tier]:
    return [Tier.HOST if h else Tier.DEVICE for h in placement_for_distance(d, num_layers)]


@register_policy
class OrbitFlow(KVPolicy):
    """OrbitFlow: per-request layer placement by ILP, refined at run time, Deposit + Pause-Resume."""

    name = "orbitflow"
    native_admission = AdmissionKind.SLO
    # How far ahead the `slo` admission judges a join (ADMISSION_HORIZONS): "lifetime", the next
    # plan window and the batch's KV peak (`lifetime_misses`); "window", the next plan window only.
    admission_horizon = "lifetime"
    # The step time a plan is judged by (LINK_MODELS): "engine", as the engine issues its copies
    # (`problem.engine_step_time`); "edf", the solver's EDF link model alone (`problem.step_time`).
    link_model = "engine"
    # At a window's end or on drift, keep the plan in force while it fits and is on time
    # (`_held`): a re-placement moves KV, and the step carrying the move runs late for the batch.
    placement_hold = True
    # Token-Deposit's join wait (`admission.bank_wait_s`): an arrival whose prefill chunks would
    # stall running streams past their TBT SLO waits while their banks grow to cover them, for as
    # long as its own TTFT slack allows; the banks count its stalls meanwhile (`_bank_targets`).
    bank_wait = True
    # The `slo` admission's tie-break (`SloAdmission.everyone_breaks_ties`): a join that costs no
    # goodput miss but makes steps late for requests whose TTFT is missed waits. False: it joins.
    everyone_breaks_ties = True
    # What a pause costs its request in Pause-for-SLO (PAUSE_COSTS): "miss", always one (of a
    # request still able to meet all its SLOs); "slack" (`orbitflow-pause-slack`), a miss only when
    # its wait outruns its TPOT slack (`pause.pause_breaks_tpot`), at run time and at the lifetime
    # peak. "miss" by default: "slack" measured better on one pressure trace and worse on another
    # (3 seeds x 3 rates, 100 requests: mean goodput lower at the two lower rates).
    pause_cost = "miss"
    uses_deposit = True
    can_pause = True
    uniform = False

    def __init__(self, num_layers: int, cost_model: OnlineCostModel | None = None,
                 distances: tuple[int, ...] | None = None, windows: tuple[int, ...] = DEFAULT_WINDOWS,
                 pause_strategy_name: str = "largest", max_pause_s: float = 30.0, slo_s: float = 0.5,
                 drift_threshold: float = 0.25, drift_patience: int = 3, solve_ahead: bool = True,
                 seed: int = 0, solver: str = "fast", deposit_pace: float = 0.9, arrival_memory_s: float = 30.0,
                 slo_pause_max_trials: int = SLO_PAUSE_MAX_TRIALS, admission_horizon: str | None = None,
                 link_model: str | None = None, prefetch_depth: int = 1, placement_hold: bool | None = None,
                 pause_cost: str | None = None, **options) -> None:
        super().__init__(num_layers, cost_model=cost_model, slo_s=slo_s, windows=windows, **options)
        horizon = self.admission_horizon if admission_horizon is None else admission_horizon
        if horizon not in ADMISSION_HORIZONS:
            raise ValueError(f"admission_horizon must be one of {ADMISSION_HORIZONS}, got {admission_horizon!r}")
        self.admission_horizon = horizon
        link_model = self.link_model if link_model is None else link_model
        if link_model not in LINK_MODELS:
            raise ValueError(f"link_model must be one of {LINK_MODELS}, got {link_model!r}")
        if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 1:
            raise ValueError(f"prefetch_depth must be an integer >= 1, got {prefetch_depth!r}")
        self.link_model, self.prefetch_depth = link_model, prefetch_depth
        hold = self.placement_hold if placement_hold is None else placement_hold
        if not isinstance(hold, bool):
            raise ValueError(f"placement_hold must be a bool, got {placement_hold!r}")
        self.placement_hold = hold
        pause_cost = self.pause_cost if pause_cost is None else pause_cost
        if pause_cost not in PAUSE_COSTS:
            raise ValueError(f"pause_cost must be one of {PAUSE_COSTS}, got {pause_cost!r}")
        self.pause_cost = pause_cost
        if isinstance(self.admission, SloAdmission):
            self.admission.everyone_breaks_ties = self.everyone_breaks_ties
        self._single = make_solver("uniform")  # the single-distance candidate of `_engine_checked`
        if max_pause_s <= 0 or drift_threshold <= 0 or drift_patience < 1:
            raise ValueError("need max_pause_s > 0, drift_threshold > 0, drift_patience >= 1")
        self.distances = distances
        self.pick_victim = pause_strategy(pause_strategy_name)
        self.max_pause_s = max_pause_s
        self.drift_threshold, self.drift_patience = drift_threshold, drift_patience
        self.solver: PlacementSolver = make_solver("uniform" if self.uniform else solver)
        self.ahead: AheadSolver = AheadSolver(self._solve, background=solve_ahead)
        self.rng = random.Random(seed)
        self.plan: Plan | None = None
        self.plan_ids: frozenset[str] = frozenset()
        self.steps_left = 0
        self._stale = False
        self._drift_run = 0
        self._predicted_s: float | None = None
        self._step_s: float | None = None  # EWMA of measured decode-step time (solve-ahead budgets)
        self._anchor: tuple[Plan, int, float] | None = None  # (plan, batch context, T) at install
        self._last_views: list[RequestView] = []
        self._cap: CapacityView | None = None
        self._refused: dict[str, tuple] = {}  # admission refused for this (running set, TTFT missed, at stake)
        self._proposal: tuple[Plan, list[str], PlacementPlan] | None = None  # the last `propose`'s
        self._peaks: dict[tuple, tuple[Plan, list[str]]] = {}  # the last two `lifetime_misses` solves
        self._protected: frozenset[str] = frozenset()  # resumed after an overlong pause: not paused again
        self._bank: dict[str, int] = {}  # Token-Deposit bank targets (`deposit_target`)
        # (id, prefill stalls) of the arrival waiting for the banks (`_waits_for_banks`)
        self._join_stalls: tuple[str, list[float]] | None = None
        self._joined_stall_s = 0.0  # prefill stall seconds of the requests that joined in this step
        self.deposit_pace = deposit_pace  # the deposit's release pace, for its bank targets
        self.arrivals = ArrivalForecast(arrival_memory_s)  # the stalls arrivals bring (bank targets)
        self._now = 0.0  # the clock of the last observed step
        self.counters = {k: 0 for k in ("plans", "pauses", "resumes", "fallbacks", "infeasible",
                                        "trigger_batch", "trigger_window", "trigger_drift",
                                        "trigger_capacity", "plans_missing_slo", "slo_pauses", "slo_pause_trials",
                                        "slo_pause_trials_max", "slo_pause_skipped", "slo_pause_capped",
                                        "engine_slower", "engine_single", "ahead_plans_held_over", "plans_held",
                                        "bank_wait_steps")}
        self.slo_pause = SloPauseSearch(self.pick_victim, self.rng, self.counters, slo_pause_max_trials)
        # the lifetime peak's own search (a probe: its counters and draws are not the policy's)
        self.peak_pause = SloPauseSearch(self.pick_victim, random.Random(seed), {}, slo_pause_max_trials)

    # ---- the problem ---------------------------------------------------------------------------
    def _inputs(self, views: list[RequestView], cap: CapacityView) -> PlanInputs:
        """The batch's problem, prefill debt taken off the SLOs (`admission.batch_plan_inputs`)."""
        return batch_plan_inputs(views, cap, self.num_layers, self.cost, self.default_slo_s, self.windows,
                                 self.distances, deposit=self.uses_deposit)

    def _prefill_debt_s(self, views: list[RequestView]) -> float:
        return prefill_debt_s(views, self.num_layers, self.cost)

    def _solve(self, views: list[RequestView], cap: CapacityView, pinned: frozenset[str],
               probe: bool = False, costs: Callable[[RequestView], bool] | None = None
               ) -> tuple[Plan, list[str]]:
        """Solve; while infeasible, pause one unpinned request and re-solve. Returns the plan and
        the ids paused to reach it. A probe (may this request join?) logs and counts nothing, and
        pauses for the SLO only given `costs` (which pauses cost their request an SLO)."""
        active, paused = list(views), []
        while True:
            inputs = self._inputs(active, cap)
            try:
                plan = self._engine_checked(self.solver.solve(inputs), inputs)
            except Exception:  # a solver bug or timeout must not stop serving
                log.exception("placement solve failed; falling back to the largest offload")
                self.counters["fallbacks"] += 1
                return self._fallback(inputs, PlanStatus.FALLBACK_ERROR), paused
            if plan.status != PlanStatus.INFEASIBLE:
                return self._pause_for_slo(plan, active, cap, pinned, paused, probe, costs)
            victims = [v for v in active if v.request_id not in pinned]
            if probe:
                if not self.can_pause or not victims:
                    return self._fallback(inputs, PlanStatus.FALLBACK_INFEASIBLE), paused
            else:
                self.counters["infeasible"] += 1
                if not self.can_pause or not victims:
                    log.warning("no placement fits %d requests in %d device bytes; largest-offload "
                                "fallback", len(active), inputs.device_capacity_bytes)
                    self.counters["fallbacks"] += 1
                    return self._fallback(inputs, PlanStatus.FALLBACK_INFEASIBLE), paused
            victim = self.pick_victim(victims, self.rng)
            active = [v for v in active if v.request_id != victim]
            paused.append(victim)

    def _judged_step_s(self, inputs: PlanInputs, distances: list[int]) -> float:
        """The step time plans are judged by (`link_model`)."""
        if self.link_model == "engine":
            return engine_step_time(inputs, distances, self.prefetch_depth)
        return step_time(inputs, distances)

    def _engine_checked(self, plan: Plan, inputs: PlanInputs) -> Plan:
        """The solver's plan judged as the engine runs it (`link_model` "engine"): its T at
        `problem.engine_step_time`, and its violations at that step time at the window's end (every
        request `growth(window)` tokens longer: the largest step of the window, since T grows with
        the contexts, where the solvers judge its first). The solvers model an EDF link, which
        gives a long-distance request of a batch mixing distances a longer window than the
        engine's copies (issued for the union of the batch's host layers, in order) do; where the
        engine's step makes the plan miss more, the best single-distance plan (where the two link
        models agree) is taken if it misses fewer, or as many in a shorter step. Unchanged with the
        "edf" link model, and for a plan the engine runs on time to the window's end."""
        if self.link_model != "engine" or plan.status is PlanStatus.INFEASIBLE or not plan.distances:
            return plan
        judged = partial(self._engine_judged, inputs=inputs)
        checked = judged(plan)
        if checked.violations <= plan.violations:
            return checked
        if len(set(plan.distances.values())) > 1:
            alt = self._single.solve(inputs)
            if alt.status is not PlanStatus.INFEASIBLE:
                alt = judged(alt)
                if (len(alt.violations), alt.predicted_step_s) < (len(checked.violations), checked.predicted_step_s):
                    self.counters["engine_single"] += 1
                    self.solver.seed(alt.distances)
                    return alt
        self.counters["engine_slower"] += 1
        return checked

    def _engine_judged(self, plan: Plan, inputs: PlanInputs) -> Plan:
        """`plan` with its T at `problem.engine_step_time` and its violations at that step at the
        window's end (every request `growth(window)` tokens longer)."""
        ds = [plan.distances[r.request_id] for r in inputs.requests]
        T = engine_step_time(inputs, ds, self.prefetch_depth)
        late = late_requests(inputs, engine_step_time(inputs, ds, self.prefetch_depth, plan.window), plan.window)
        return replace(plan, predicted_step_s=T, violations=late)

    def _held(self, views: list[RequestView], cap: CapacityView) -> Plan | None:
        """The plan in force as it would run another window (`placement_hold`): its distances
        re-judged at the batch's contexts now, per window, longest first; where they do not fit
        the device at a window's end, shrunk (`_shrunk`: device -> host, the fewest copies). The
        first window predicting no miss for a request still able to meet all its SLOs, else the
        one predicting the fewest (the caller then solves and weighs, `_holds_better`); None when
        none fits, or the plan in force is a fallback or not this batch's. A new placement moves
        KV: its copies land in one step (device -> host waited for before it computes), which
        then runs late for every request of the batch, while a request meets TBT with at most
        1 % of its gaps late."""
        plan = self.plan
        if plan is None or plan.status.is_fallback or not all(v.request_id in plan.distances for v in views):
            return None
        inputs, missed = self._inputs(views, cap), ttft_missed_ids(views)
        now = [plan.distances[v.request_id] for v in views]
        best = None
        for w in sorted(inputs.windows, reverse=True):
            ds = now
            if device_bytes(inputs, ds, w) > inputs.device_capacity_bytes:
                ds = self._shrunk(inputs, ds, w)  # the batch outgrew its placement: offload the least
                if ds is None:
                    continue
            held = make_plan(inputs, ds, self._judged_step_s(inputs, ds), w, plan.status, time.perf_counter(),
                             plan.solver)
            if self.link_model == "engine":
                held = self._engine_judged(held, inputs)
            if not held.violations - missed:
                return held
            if best is None or len(held.violations - missed) < len(best.violations - missed):
                best = held
        return best

    def _holds_better(self, held: Plan, solved: tuple[Plan, list[str]], views: list[RequestView],
                      cap: CapacityView, missed: set[str]) -> bool:
        """Whether the plan in force (`held`, its distances re-judged) beats the new solve. With
        pauses in the solve, by misses (violations plus pauses). Otherwise by the late gaps each
        predicts over its window for the requests still able to meet all their SLOs
        (`_late_gaps`), the new plan's first step carrying the KV it moves (`_moved_bytes`),
        which makes that step late for the whole batch when the copies push it past the SLO."""
        plan, paused = solved
        if paused:
            return len(held.violations - missed) <= len(plan.violations - missed) + len(set(paused) - missed)
        inputs = self._inputs(views, cap)
        moved = self._moved_bytes(inputs, held.distances, plan.distances)
        return self._late_gaps(held, inputs, missed) <= self._late_gaps(plan, inputs, missed, moved)

    def _late_gaps(self, plan: Plan, inputs: PlanInputs, missed: set[str], moved_bytes: int = 0) -> int:
        """Late gaps `plan` predicts over its window for the requests of `inputs` not in `missed`:
        its step grows from T (now) to T at the window's end about linearly, so a request whose
        effective SLO lies between is late for the window's tail past that crossing; the first
        step, carrying `moved_bytes` of copies on the link, is late where they push it over."""
        ds = [plan.distances[r.request_id] for r in inputs.requests]
        W, T0 = plan.window, self._judged_step_s(inputs, ds)
        end = replace(inputs, requests=tuple(replace(r, context_tokens=r.context_tokens + r.growth(W))
                                             for r in inputs.requests))
        T1 = self._judged_step_s(end, ds)
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
    def _moved_bytes(inputs: PlanInputs, old: dict[str, int], new: dict[str, int]) -> int:
        """KV bytes re-placing the batch from distances `old` to `new` copies (either way)."""
        L, bs, total = inputs.num_layers, inputs.block_size, 0
        for r in inputs.requests:
            a, b = placement_for_distance(old[r.request_id], L), placement_for_distance(new[r.request_id], L)
            total += sum(x != y for x, y in zip(a, b)) * -(-r.context_tokens // bs) * bs
        return total * inputs.kv_bytes_per_token_per_layer

    def _shrunk(self, inputs: PlanInputs, ds: list[int], window: int) -> list[int] | None:
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
                key = self._judged_step_s(inputs, trial) + self._moved_bytes(inputs, old, dict(zip(ids, trial))) / bw
                if best is None or key < best[0]:
                    best = (key, trial)
            if best is None:
                return None
            ds = best[1]
        return ds

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
            step = self.num_layers * self._inputs(active, cap).compute_per_layer_s

            def costs(v: RequestView) -> bool:
                rest = [u.max_new_tokens_left for u in active if u.request_id != v.request_id]
                return pause_breaks_tpot(v.max_new_tokens_left, min(rest, default=0), step,
                                         v.slo_s or self.default_slo_s)
        search = self.peak_pause if probe else self.slo_pause
        best, extra = search.search(plan, active, pinned, lambda views: self._inputs(views, cap),
                                    lambda inputs: self._engine_checked(self.solver.solve(inputs), inputs),
                                    self.solver.seed, costs)
        return best, paused + extra

    def _fallback(self, inputs: PlanInputs, status: PlanStatus) -> Plan:
        """Every request at its largest offload short of all-host, all-host where only that holds
        it (`PlanInputs.largest_offload`); the scheduler's preemption covers what does not fit."""
        choice = inputs.largest_offload()
        return make_plan(inputs, choice, step_time(inputs, choice), inputs.windows[0],
                         status, time.perf_counter(), status.value)

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
            plan, paused = self._solve(list(views), cap, frozenset(pinned))
        finally:
            self.solver.set_deadline(None)
        return PlanResult(plan, tuple(paused))

    def use_cost_model(self, model: CostModel) -> None:
        """Plan on `model` (the central planner: the worker's fit) (`PlanningPolicy`)."""
        self.cost.model = model

    def attach_remote(self, remote: RemoteSolve | None) -> None:
        """Send the window and drift re-plans to the central planner (`PlanningPolicy`)."""
        self.ahead.attach_remote(remote)

    def admission_damage(self, reqs: list[RequestView], running: list[RequestView], cap: CapacityView
                         ) -> list[float]:
        """Per request of `reqs` (each alone), the SLO misses the plan predicts if it joined now,
        beyond the batch's own (solved once for all), or 0 under `fcfs` admission; inf when it
        could join only by pausing others or not at all (the router then prefers another worker)."""
        slo_aware = self.admission.kind is AdmissionKind.SLO
        base = len(self._solve(list(running), cap, frozenset(), probe=True)[0].violations) if running else 0
        out = []
        for req in reqs:
            plan, paused = self._solve(list(running) + [req], cap, frozenset({req.request_id}), probe=True)
            joins = not paused and req.request_id in plan.distances and not plan.status.is_fallback
            damage = max(0, len(plan.violations) - base) if slo_aware else 0
            out.append(float(damage) if joins else float("inf"))
        return out

    # ---- applying plans ------------------------------------------------------------------------
    def _install(self, plan: Plan, views: list[RequestView], paused: list[str]) -> PlacementPlan:
        placements = self._placements(plan, views, paused)
        self.plan = plan
        self.plan_ids = frozenset(plan.distances)
        self.steps_left = plan.window
        self._stale, self._drift_run = False, 0
        self.counters["plans"] += 1
        self.counters["pauses"] += len(paused)
        if plan.violations:  # no placement meets these SLOs: the plan keeps the misses fewest
            self.counters["plans_missing_slo"] += 1
            log.info("plan of %d requests cannot meet the SLO of %s (step %.1f ms)", len(plan.distances),
                     sorted(plan.violations), plan.predicted_step_s * 1e3)
        return placements

    def _placements(self, plan: Plan, views: list[RequestView], paused: list[str]) -> PlacementPlan:
        """What installing `plan` changes: placements that differ from the views', and the pauses."""
        current = {v.request_id: v.placement for v in views}
        changed = {}
        for rid, d in plan.distances.items():
            tiers = tiers_for_distance(d, self.num_layers)
            if current.get(rid) is None or list(current[rid]) != tiers:
                changed[rid] = tiers
        return PlacementPlan(changed, pause=paused)

    def _overdue(self, views: list[RequestView]) -> frozenset[str]:
        return frozenset(v.request_id for v in views if v.paused_s is not None and v.paused_s > self.max_pause_s)

    # ---- the KVPolicy interface ----------------------------------------------------------------
    def place_new(self, req: RequestView, cap: CapacityView) -> list[Tier]:
        """On its own: the largest offload short of all-host, or all-host if even that cannot hold
        its KV at its longest on the device (what an arrival is checked against: if neither
        holds it, no plan ever will)."""
        ds, L = distance_set(self.distances, self.num_layers), self.num_layers
        tiers = tiers_for_distance(([d for d in ds if d != ALL_HOST] or [ALL_HOST])[0], L)
        longest = -(-(req.num_prompt_tokens + req.max_tokens) // cap.block_size)
        if ds[0] == ALL_HOST and tiers.count(Tier.DEVICE) * longest > cap.device_total_blocks:
            return tiers_for_distance(ALL_HOST, L)
        return tiers

    def propose(self, req: RequestView, running: list[RequestView], cap: CapacityView
                ) -> PlacementPlan | None:
        """The batch's plan re-solved with `req` in it (kept, with its pauses, for `admit` to
        install); None when no plan holds it: the solve fell back for lack of room, left it out,
        or had to pause others (allowed only for a request paused past `max_pause_s`)."""
        pinned = self._overdue([req])
        views = running + [req]
        plan, paused = self.ahead.solve_now(views, cap, pinned | {req.request_id}, not pinned)
        refused = plan.status is PlanStatus.FALLBACK_INFEASIBLE or (
            plan.status is PlanStatus.FALLBACK_ERROR and plan.device_bytes > cap.device_total_blocks * cap.block_bytes)
        if req.request_id not in plan.distances or refused or (paused and not pinned):
            self._proposal = None
            return None
        placements = self._placements(plan, views, paused)
        self._proposal = (plan, paused, placements)
        return placements

    def predicted_misses(self, views: list[RequestView], plan: PlacementPlan | None, cap: CapacityView,
                         everyone: bool = False) -> int:
        """From the plans: the proposal's violation set when `plan` is the last proposal; for the
        batch as it runs (`plan` None), the plan in force's, or 0 when that plan is not this batch's
        (it is re-solved at the next step anyway). Requests whose TTFT SLO is missed already do not
        count unless `everyone` (`KVPolicy.predicted_misses`)."""
        missed = set() if everyone else ttft_missed_ids(views)
        if plan is None:
            ids = frozenset(v.request_id for v in views)
            return len(self.plan.violations - missed) if self.plan is not None and self.plan_ids == ids else 0
        if self._proposal is not None and plan is self._proposal[2]:
            return len(self._proposal[0].violations - missed)
        return super().predicted_misses(views, plan, cap, everyone)

    def lifetime_misses(self, views: list[RequestView], cap: CapacityView, everyone: bool = False) -> int | None:
        """With the `lifetime` horizon, the misses of the batch at its KV peak
        (`admission.lifetime_peak`), solved as a probe (charged as a solve, installs nothing; the
        last two peaks' solves are kept, so `everyone` reuses them): the requests the solve must
        pause to fit the device there (each a late gap, or a TPOT miss while it waits), plus the
        plan's violations, of requests still able to meet all their SLOs (of all, with
        `everyone`). None with the `window` horizon (`KVPolicy.lifetime_misses`)."""
        if self.admission_horizon != "lifetime":
            return None
        peak = lifetime_peak(views)
        if not peak:
            return 0
        missed = set() if everyone else ttft_missed_ids(peak)
        inputs = self._inputs(peak, cap)
        L, w = self.num_layers, inputs.windows[0]
        if L in inputs.distances and device_bytes(inputs, [L] * len(peak), w) <= inputs.device_capacity_bytes:
            # all on device fits the peak: the plan is that (no stall, no pause), its misses the
            # compute's alone (nothing banked there), known without a solve on the decode thread
            return len(certain_late(inputs) - missed)
        costs = self._peak_pause_costs(views, inputs) if self.pause_cost == "slack" else None
        key = (self._key(views), tuple(v.ttft_missed for v in peak), cap)
        if key not in self._peaks:
            self._peaks = {**dict(list(self._peaks.items())[-1:]),
                           key: self.ahead.solve_now(peak, cap, frozenset(), True, costs)}
        plan, paused = self._peaks[key]
        if costs is not None:
            by_id = {v.request_id: v for v in peak}
            paused = [rid for rid in paused if costs(by_id[rid])]
        return len(set(paused) - missed) + len(plan.violations - missed)

    def _peak_pause_costs(self, views: list[RequestView], peak: PlanInputs) -> Callable[[RequestView], bool]:
        """Which pauses at the lifetime peak cost their request an SLO (`pause_cost` "slack"): one
        paused when the batch first outgrows the device with every layer there
        (`admission.outgrow_wait`) waits until the batch next shrinks, at steps on time; that costs
        it its TPOT when the wait outruns its slack from there at the peak's compute-only step
        (`pause.pause_breaks_tpot`)."""
        out = outgrow_wait(views, peak.device_capacity_bytes // (peak.num_layers * peak.kv_bytes_per_token_per_layer))
        t, wait = out if out is not None else (0, 0)
        left = {v.request_id: v.max_new_tokens_left - t for v in views}
        step = peak.num_layers * peak.compute_per_layer_s
        return lambda v: pause_breaks_tpot(max(left.get(v.request_id, 0), 0), wait, step,
                                           v.slo_s or self.default_slo_s)

    def admit(self, req: RequestView, running: list[RequestView], cap: CapacityView
              ) -> PlacementPlan | None:
        """`propose`, then the admission decides (natively `slo`: the plan with `req` misses no
        more SLOs than the batch already does plus, when waiting would cost it its TTFT SLO
        (`admission.ttft_at_stake`), that miss). A request paused past `max_pause_s` joins whenever
        a plan holds it (no starvation)."""
        pinned = self._overdue([req])
        if not pinned and self._waits_for_banks(req, running):
            return None
        # what a refusal weighs: the batch, those in it whose TTFT is missed, whether waiting costs req its TTFT
        ids = (frozenset(v.request_id for v in running), frozenset(ttft_missed_ids(running)),
               ttft_at_stake(req, running, self.num_layers, self.cost))
        if not pinned and self._refused.get(req.request_id) == ids:
            return None  # the same batch refused it before; it only grew since
        proposal = self.propose(req, running, cap)
        if proposal is None or not (pinned or self.admission.admits(self, req, running, cap, proposal)):
            self._refused[req.request_id] = ids
            return None
        plan, paused, _ = self._proposal
        self._refused.pop(req.request_id, None)
        first = prefill_stalls_s(req, self.num_layers, self.cost, self.prefill_chunk_tokens)[:1]
        self._joined_stall_s += sum(first)  # its first chunk stalls this step (`_waits_for_banks`)
        if req.paused_s is not None:
            self.counters["resumes"] += 1
            self._protected |= pinned
        return self._install(plan, running + [req], paused)

    def _waits_for_banks(self, req: RequestView, running: list[RequestView]) -> bool:
        """Token-Deposit's join wait (`bank_wait`): True when `req`'s prefill would cost running
        requests their TBT SLO and waiting for their banks (`admission.bank_wait_s`) still lets it
        make its TTFT SLO (its prefill and the wait within its slack; no TTFT SLO: any finite
        wait), and nobody waits behind it (`RequestView.num_waiting_behind`: with a queue, held
        joins bunch up behind it and each stalls the streams again; holding a queued head lost
        goodput on ShareGPT-like traces at 4 req/s). Its chunks' stalls count in the bank targets
        until it joins; the first chunk's stall includes those of the requests that joined in this
        step already (their first chunks run in it too). The stalls are taken `drift_threshold`
        longer than the cost model predicts: the error the policy accepts of its step predictions
        before it re-plans (a prefill chunk's attention, quadratic in its length, is not in the
        linear cost model)."""
        self._join_stalls = None
        if not (self.bank_wait and self.uses_deposit and running and not req.num_waiting_behind
                and self.admission.kind is AdmissionKind.SLO):
            return False
        wait, stalls = bank_wait_s(req, running, self.num_layers, self.cost, self.prefill_chunk_tokens,
                                   self.deposit_pace, self.default_slo_s, self._predicted_s,
                                   1 + self.drift_threshold, self._joined_stall_s)
        slack, own = req.ttft_slack_s, prefill_debt_s([req], self.num_layers, self.cost)
        if wait <= 0 or math.isinf(wait) or (slack is not None and own + wait > slack):
            return False
        self._join_stalls = (req.request_id, stalls)
        self.counters["bank_wait_steps"] += 1
        return True

    def replan(self, running: list[RequestView], cap: CapacityView) -> PlacementPlan | None:
        self._cap = cap
        self._joined_stall_s = 0.0  # a new step: nobody has joined in it yet
        self._last_views = running
        self.steps_left -= 1
        if not running:
            self.plan, self.plan_ids = None, frozenset()
            return None
        reason = self._trigger(running, cap)
        result = None
        if reason is not None:
            self.counters[f"trigger_{reason}"] += 1
            held = self._held(running, cap) if self.placement_hold and reason in ("window", "drift") else None
            missed = ttft_missed_ids(running)
            # a plan solved ahead for this batch (by the central planner or the local thread)
            ready = self.ahead.take(self._key(running)) if reason in ("window", "drift") else None
            if ready is not None:
                ready_plan, ready_paused = ready  # a (plan, paused) pair, or the central planner's PlanResult
                ready = (ready_plan, list(ready_paused))
            if held is not None and not held.violations - missed:
                # The plan in force is on time: a ready plan is taken only when it moves no KV (the
                # same placement, at the window its solver chose) or buys late gaps back.
                solved = (held, [])
                if ready is not None and ((not ready[1] and ready[0].distances == held.distances)
                                          or not self._holds_better(held, ready, running, cap, missed)):
                    solved = ready
            else:
                solved = ready if ready is not None else self.ahead.solve_now(running, cap, self._protected)
                if held is not None and self._holds_better(held, solved, running, cap, missed):
                    solved = (held, [])  # the new placement buys no late gap back: no move
            self.counters["ahead_plans_held_over"] += ready is not None and solved[0] is held
            plan, paused = solved
            self.counters["plans_held"] += plan is held
            result = self._install(plan, running, paused)
        self._predict(running, cap)
        self._bank = self._bank_targets(running)
        self._solve_ahead(running, cap)
        return result

    def _solve_ahead(self, running: list[RequestView], cap: CapacityView) -> None:
        """Ask for the plan of the window's last step now if it is `lead_steps` or fewer away (one
        step for the local thread; the central planner's round trip in steps otherwise), for the
        batch predicted there: every request `ahead` tokens longer, those finished by then gone."""
        ahead = 1 if self._stale else self.steps_left
        if ahead < 1 or ahead > self.ahead.lead_steps(self._step_s, max(self.steps_left, 1)):
            return
        nxt = [_advance(v, ahead) for v in running if v.max_new_tokens_left > ahead]
        if nxt and not self.ahead.pending(self._key(nxt)):
            budget = None if self._step_s is None else ahead * self._step_s
            self.ahead.submit(self._key(nxt), nxt, cap, self._protected, budget_s=budget)

    def _trigger(self, running: list[RequestView], cap: CapacityView) -> str | None:
        if self.plan is None or frozenset(v.request_id for v in running) != self.plan_ids:
            return "batch"
        if self._growth_blocks(running) > cap.device_free_blocks:
            return "capacity"
        if self.steps_left <= 0:
            return "window"
        if self._stale:
            return "drift"
        return None

    def _growth_blocks(self, running: list[RequestView]) -> int:
        """Device blocks the next step allocates: one per device layer of a request at a block edge."""
        bs = self._cap.block_size if self._cap else 1
        return sum(sum(t == Tier.DEVICE for t in v.placement or ()) for v in running if v.num_tokens % bs == 0)

    @staticmethod
    def _key(views: list[RequestView]) -> tuple:
        return tuple(sorted((v.request_id, v.num_tokens) for v in views))

    def _predict(self, running: list[RequestView], cap: CapacityView) -> None:
        """The plan's step time at the current contexts: T at install, plus the attention cost of
        the tokens added since (the stall's growth is second order next to the drift threshold)."""
        if self.plan is None:
            self._predicted_s = None
            return
        ctx = sum(v.num_tokens for v in running if v.request_id in self.plan.distances)
        if self._anchor is None or self._anchor[0] is not self.plan:
            views = [v for v in running if v.request_id in self.plan.distances]  # paused ones leave
            inputs = self._inputs(views, cap)
            T = self._judged_step_s(inputs, [self.plan.distances[v.request_id] for v in views])
            self._anchor = (self.plan, ctx, T)
        _, ctx0, T0 = self._anchor
        self._predicted_s = T0 + self.num_layers * self.cost.model.compute_b_s_per_token * (ctx - ctx0)

    def _bank_targets(self, running: list[RequestView]) -> dict[str, int]:
        """Token-Deposit: per planned request, the tokens that cover the stalls predicted over the
        next plan window (`deposit.bank_target`): the plan's step above the request's SLO, the
        prefill the batch still owes, the prefills of the arrivals forecast from the recent ones
        (`deposit.ArrivalForecast`: arrivals are not in the plan's inputs), and the chunks of an
        arrival waiting for these banks (`_waits_for_banks`). 0 where none is
        predicted: on an idle server a stream goes out as produced."""
        if not self.uses_deposit or self.plan is None or self._predicted_s is None:
            return {}
        kp = self.num_layers * self.cost.model.compute_p_s_per_token
        for v in running:
            self.arrivals.note(v.request_id, v.arrival_time, kp * v.num_prompt_tokens)
        T, W = self._predicted_s, self.plan.window
        stalls = [self._prefill_debt_s(running)] + self.arrivals.stalls(self._now, W * T)
        if self._join_stalls is not None:  # an arrival waiting for these banks (`_waits_for_banks`)
            stalls += self._join_stalls[1]
        return {v.request_id: bank_target(T, v.slo_s or self.default_slo_s, min(W, v.max_new_tokens_left),
                                          stalls, self.deposit_pace)
                for v in running if v.request_id in self.plan.distances}

    def deposit_target(self, request_id: str) -> int | None:
        return self._bank.get(request_id, 0)

    def observe(self, stats: StepStats) -> None:
        """Runtime feedback: the cost model learns from every step; a decode-only step that
        misses the prediction by more than the threshold, `drift_patience` times in a row,
        marks the plan stale (re-solved one step ahead, on the refitted model)."""
        self._now = stats.now
        if stats.num_decodes and stats.new_tokens == stats.num_decodes:  # what solving ahead budgets
            self._step_s = stats.wall_s if self._step_s is None else 0.8 * self._step_s + 0.2 * stats.wall_s
        pred = self._predicted_s
        if pred is None or stats.new_tokens != stats.num_decodes or pred <= 0:
            return
        if abs(stats.wall_s / pred - 1) > self.drift_threshold:
            self._drift_run += 1
            if self._drift_run >= self.drift_patience:
                self._stale = True
                self._drift_run = 0
        else:
            self._drift_run = 0

    def request_finished(self, request_id: str) -> None:
        self.arrivals.forget(request_id)
        if self._join_stalls is not None and self._join_stalls[0] == request_id:
            self._join_stalls = None
        self._refused.pop(request_id, None)
        self._protected -= {request_id}

    def close(self) -> None:
        self.ahead.close()

    def num_solves(self) -> int:
        return self.ahead.stats["solves_sync"] + self.ahead.stats["solves_ahead"]

    def plan_solver(self) -> str | None:
        return None if self.plan is None else self.plan.solver

    def metrics(self) -> dict[str, float]:
        solver = {f"solver_{k}": v for k, v in self.solver.stats.items()}
        return {**super().metrics(), **self.counters, **self.ahead.stats, **solver,
                "cost_model_fits": self.cost.num_fits}


def distance_of(placement: tuple[Tier, ...] | None, num_layers: int, distances: tuple[int, ...]) -> int | None:
    """The distance whose placement this is (None: no placement, or none of `distances` makes it)."""
    if placement is None:
        return None
    host = [t == Tier.HOST for t in placement]
    return next((d for d in distances if placement_for_distance(d, num_layers) == host), None)


def _advance(v: RequestView, steps: int = 1) -> RequestView:
    """The view `steps` decode steps later (the batch a plan asked for ahead will run on)."""
    return replace(v, num_tokens=v.num_tokens + steps, num_output_tokens=v.num_output_tokens + steps)


@register_policy
class OrbitFlowUniform(OrbitFlow):
    """Ablation: one prefetch distance for the whole batch."""

    name = "orbitflow-uniform"
    uniform = True


@register_policy
class OrbitFlowNoDeposit(OrbitFlow):
    """Ablation: no Token-Deposit (tokens stream as produced; no credit in the solve)."""

    name = "orbitflow-no-deposit"
    uses_deposit = False


@register_policy
class OrbitFlowNoBankWait(OrbitFlow):
    """Ablation: no join wait for the Token-Deposit banks (an arrival's prefill stalls the streams
    as soon as the admission lets it join)."""

    name = "orbitflow-no-bank-wait"
    bank_wait = False


@register_policy
class OrbitFlowNoPause(OrbitFlow):
    """Ablation: no Pause-Resume (an infeasible batch runs at the largest offload; swaps cover it).
    """

    name = "orbitflow-no-pause"
    can_pause = False


@register_policy
class OrbitFlowWindowAdmit(OrbitFlow):
    """Ablation: `slo` admission judged over the next plan window only, not the batch's lifetime."""

    name = "orbitflow-window-admit"
    admission_horizon = "window"


@register_policy
class OrbitFlowEdfLink(OrbitFlow):
    """Ablation: plans judged by the solver's EDF link model alone, not the engine's copy order."""

    name = "orbitflow-edf-link"
    link_model = "edf"


@register_policy
class OrbitFlowNoHold(OrbitFlow):
    """Ablation: every window's end re-places the batch as solved, even when the plan in force holds."""

    name = "orbitflow-no-hold"
    placement_hold = False



@register_policy
class OrbitFlowTiesJoin(OrbitFlow):
    """Ablation: a join that ties on goodput misses joins, whatever late steps it brings those whose
    TTFT is missed."""

    name = "orbitflow-ties-join"
    everyone_breaks_ties = False


@register_policy
class OrbitFlowPauseSlack(OrbitFlow):
    """Variant: a pause counts as its request's miss only when its wait outruns its TPOT slack."""

    name = "orbitflow-pause-slack"
    pause_cost = "slack"
