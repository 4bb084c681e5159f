"""The OrbitFlow policy: SLO-aware per-request, per-layer KV placement, refined at run time.

Three rooms, each its own module:

- this one, the policy (the `KVPolicy` interface: `place_new`, `propose`, `admit`, `replan`,
  `observe`, `deposit_target`, `request_finished`, `metrics`; the `PlanningPolicy` hooks), which
  owns the plan in force, admission, Token-Deposit's bank targets and the ablation subclasses;
- `orbitflow_solve.py`, the solve/pause loop (`SolveLoop`): each planning event's `PlanInputs`
  from the running batch (context lengths, tokens left, SLOs, Token-Deposit credit) and the online
  cost model, solved by the solver named by `solver` (`solvers.py`: on a worker "fast", a certified
  heuristic with counted, deterministic budgets; on the central planner "cvxpy-highs", the fast
  plan improved by the compact ILP in cvxpy + HiGHS, never worse than it; `problem.py` has the
  model), judged as the engine runs it, with Pause-Resume and Pause-for-SLO around it and the
  fallback on a solver error;
- `orbitflow_triggers.py`, the refinement triggers (`RefineTriggers`): a plan holds for its window of
  W decode steps and is re-solved when the batch changes, the window runs out, measured step time
  drifts from the prediction or the next step's growth does not fit the device; the next
  predictable re-plan (the window's end, or the first finish at max_tokens if sooner) is solved
  ahead (one step locally; centrally as many steps as the measured round trip needs, for the batch
  predicted there, adopted if back by the step that needs it or by an earlier re-plan of the same
  requests (drift), else the fast path solves on the spot).

At a window's end, on drift and when the batch changed but for a finish (a join installs the plan
its admission weighed; a finish frees room the solve gives back to the others, so it is always
re-solved) the plan in force is kept without a solve while it fits (shrunk one
request a distance class down at a time when the batch outgrew it) and predicts no miss for a
request still able to meet all its SLOs (`placement_hold`, `SolveLoop.held`); a solve is adopted
over it only when it predicts fewer late gaps over its window (its first step carrying its copies)
or it pauses to miss less. A re-placement's copies land in one step, which then runs late for every
request of the batch, and TBT allows 1 % of a request's gaps late (`orbitflow-no-hold` is the
ablation). Admission (`slo`) also weighs the batch's KV peak over its lifetime (`admission_horizon`
"lifetime", `lifetime_misses`), and breaks a tie on goodput misses on everyone's late steps
(`everyone_breaks_ties`; `orbitflow-ties-join` is the ablation). Paused requests keep all their KV
on host and rejoin, oldest first, when the plan admits them again; one paused longer than
`max_pause_s` is pinned: the solve pauses others instead, so nobody starves. No request is ever
dropped.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

from orbitflow_ray.costmodel import CostModel, OnlineCostModel
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner.admission import (AdmissionKind, SloAdmission, bank_wait_s, lifetime_peak, outgrow_wait,
                                             prefill_debt_s, prefill_stalls_s, ttft_at_stake, ttft_missed_ids)
from orbitflow_ray.planner.ahead import AheadSolver
from orbitflow_ray.planner.base import (CapacityView, KVPolicy, PlacementPlan, RequestView,
                                        StepStats, register_policy)
from orbitflow_ray.planner.deposit import bank_target
from orbitflow_ray.planner.orbitflow_solve import LINK_MODELS, PAUSE_COSTS, SolveLoop
from orbitflow_ray.planner.orbitflow_triggers import RefineTriggers, batch_key, covers
from orbitflow_ray.planner.pause import SLO_PAUSE_MAX_TRIALS, pause_breaks_tpot, pause_strategy
from orbitflow_ray.planner.planning import PlanResult, RemoteSolve
from orbitflow_ray.planner.problem import (ALL_HOST, DEFAULT_WINDOWS, Plan, PlanInputs, PlanStatus,
                                           all_device_fits, certain_late, distance_set,
                                           placement_for_distance)
from orbitflow_ray.planner.solvers import PlacementSolver, make_solver

log = logging.getLogger(__name__)
ADMISSION_HORIZONS = ("lifetime", "window")  # `OrbitFlow.admission_horizon`
# A refused request is offered again to the same batch only once the arrivals' prefill load has
# fallen this much since its refusal (a lower load loosens the SLOs it is judged by; each offer is a solve)
LOAD_RETRY = 0.01


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
    # At a window's end, on drift and on a batch change but a finish, keep the plan in force while
    # it fits and is on time (`SolveLoop.held`): a re-placement moves KV, and the step carrying the
    # move runs late for the batch. A finish is re-solved: the room it frees goes to the others.
    placement_hold = True
    # Token-Deposit's join wait (`admission.bank_wait_s`): an arrival whose prefill chunks would
    # stall running streams past their TBT SLO waits while their banks grow to cover them, for as
    # long as its own TTFT slack allows; the banks count its stalls meanwhile (`_bank_targets`).
    bank_wait = True
    # The `slo` admission's tie-break (`SloAdmission.everyone_breaks_ties`): a join that costs no
    # goodput miss but makes steps late for requests whose TTFT is missed waits. False: it joins.
    everyone_breaks_ties = True
    # The `slo` admission's queue order (`SloAdmission.step_aside`): a queued request whose TTFT SLO
    # is lost lets those behind it that can still meet theirs go first. False: arrival order.
    step_aside = True
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
                 seed: int = 0, solver: str = "fast", deposit_pace: float = 0.9,
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
            self.admission.step_aside = self.step_aside
        if max_pause_s <= 0 or drift_threshold <= 0 or drift_patience < 1:
            raise ValueError("need max_pause_s > 0, drift_threshold > 0, drift_patience >= 1")
        self.distances = distances
        self.max_pause_s = max_pause_s
        self.counters = {k: 0 for k in ("plans", "pauses", "resumes", "fallbacks", "infeasible",
                                        "trigger_batch", "trigger_window", "trigger_drift",
                                        "trigger_capacity", "plans_missing_slo", "slo_pauses", "slo_pause_trials",
                                        "slo_pause_trials_max", "slo_pause_skipped", "slo_pause_capped",
                                        "engine_slower", "engine_single", "ahead_plans_held_over", "plans_held",
                                        "bank_wait_steps", "plans_fit_whole")}
        self.solve_loop = SolveLoop(num_layers, self.cost, self.default_slo_s, self.windows, distances,
                                    make_solver("uniform" if self.uniform else solver), self.counters,
                                    pause_strategy(pause_strategy_name), seed, slo_pause_max_trials,
                                    self.uses_deposit, self.can_pause, link_model, prefetch_depth, pause_cost)
        self.ahead: AheadSolver = AheadSolver(self.solve_loop.solve, background=solve_ahead, covers=covers)
        self.triggers = RefineTriggers(num_layers, self.cost, self.solve_loop, self.ahead, drift_threshold,
                                       drift_patience)
        self.plan: Plan | None = None
        self.plan_ids: frozenset[str] = frozenset()
        # admission refused for this (running set, TTFT missed, at stake), at this prefill load
        self._refused: dict[str, tuple[tuple, float]] = {}
        self._proposal: tuple[Plan, list[str], PlacementPlan] | None = None  # the last `propose`'s
        self._peaks: dict[tuple, tuple[Plan, list[str]]] = {}  # the last two `lifetime_misses` solves
        self._protected: frozenset[str] = frozenset()  # resumed after an overlong pause: not paused again
        self._bank: dict[str, int] = {}  # Token-Deposit bank targets (`deposit_target`)
        # (id, prefill stalls) of the arrival waiting for the banks (`_waits_for_banks`)
        self._join_stalls: tuple[str, list[float]] | None = None
        self._joined_stall_s = 0.0  # prefill stall seconds of the requests that joined in this step
        self.deposit_pace = deposit_pace  # the deposit's release pace, for its bank targets
        self.solve_loop.prefill_load = self.prefill_load  # the arrivals' prefill load off the SLOs

    @property
    def solver(self) -> PlacementSolver:
        """The placement solver the solve loop runs (replaceable: tests and benches wrap it)."""
        return self.solve_loop.solver

    @solver.setter
    def solver(self, solver: PlacementSolver) -> None:
        self.solve_loop.solver = solver

    # ---- planning on another's behalf (`PlanningPolicy`) ---------------------------------------
    def solve_for(self, views: list[RequestView], cap: CapacityView, pinned: frozenset[str] = frozenset(),
                  deadline: float | None = None) -> PlanResult:
        """One planning solve on another's behalf (`SolveLoop.solve_for`)."""
        return self.solve_loop.solve_for(views, cap, pinned, deadline)

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
        base = len(self.solve_loop.solve(list(running), cap, frozenset(), probe=True)[0].violations) if running else 0
        out = []
        for req in reqs:
            plan, paused = self.solve_loop.solve(list(running) + [req], cap, frozenset({req.request_id}), probe=True)
            joins = not paused and req.request_id in plan.distances and not plan.status.is_fallback
            damage = max(0, len(plan.violations) - base) if slo_aware else 0
            out.append(float(damage) if joins else float("inf"))
        return out

    # ---- applying plans ------------------------------------------------------------------------
    def _install(self, plan: Plan, views: list[RequestView], paused: list[str]) -> PlacementPlan:
        placements = self._placements(plan, views, paused)
        self.plan = plan
        self.plan_ids = frozenset(plan.distances)
        self.triggers.installed(plan)
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

    def predicted_miss_ids(self, views: list[RequestView], plan: PlacementPlan | None, cap: CapacityView,
                           everyone: bool = False) -> set[str]:
        """From the plans: the proposal's violation set when `plan` is the last proposal; for the
        batch as it runs (`plan` None), the plan in force's, or none when that plan is not this
        batch's (it is re-solved at the next step anyway). Requests whose TTFT SLO is missed already
        do not count unless `everyone` (`KVPolicy.predicted_miss_ids`)."""
        missed = set() if everyone else ttft_missed_ids(views)
        if plan is None:
            ids = frozenset(v.request_id for v in views)
            return set(self.plan.violations) - missed if self.plan is not None and self.plan_ids == ids else set()
        if self._proposal is not None and plan is self._proposal[2]:
            return set(self._proposal[0].violations) - missed
        return super().predicted_miss_ids(views, plan, cap, everyone)

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
        inputs = self.solve_loop.inputs(peak, cap)
        if all_device_fits(inputs, inputs.windows[0]):
            # all on device fits the peak: the plan is that (no stall, no pause), its misses the
            # compute's alone (nothing banked there), known without a solve on the decode thread
            return len(certain_late(inputs) - missed)
        costs = self._peak_pause_costs(views, inputs) if self.pause_cost == "slack" else None
        key = (batch_key(views), tuple(v.ttft_missed for v in peak), cap, round(self.prefill_load(), 2))
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
        # what a refusal weighs: the batch, those in it whose TTFT is missed, whether waiting costs req
        # its TTFT; and the arrivals' prefill load it was refused at
        ids = (frozenset(v.request_id for v in running), frozenset(ttft_missed_ids(running)),
               ttft_at_stake(req, running, self.num_layers, self.cost, self.prefill_chunk_tokens))
        load = self.prefill_load()
        refused = self._refused.get(req.request_id)
        if not pinned and refused is not None and refused[0] == ids and load > refused[1] - LOAD_RETRY:
            return None  # the same batch refused it before, at about this load or less; it only grew since
        proposal = self.propose(req, running, cap)
        if proposal is None or not (pinned or self.admission.admits(self, req, running, cap, proposal)):
            self._refused[req.request_id] = (ids, load)
            return None
        plan, paused, _ = self._proposal
        self._refused.pop(req.request_id, None)
        self.note_admitted(req)
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
                                   self.deposit_pace, self.default_slo_s, self.triggers.predicted_s,
                                   1 + self.triggers.drift_threshold, self._joined_stall_s)
        slack, own = req.ttft_slack_s, prefill_debt_s([req], self.num_layers, self.cost)
        if wait <= 0 or math.isinf(wait) or (slack is not None and own + wait > slack):
            return False
        self._join_stalls = (req.request_id, stalls)
        self.counters["bank_wait_steps"] += 1
        return True

    def replan(self, running: list[RequestView], cap: CapacityView) -> PlacementPlan | None:
        self._joined_stall_s = 0.0  # a new step: nobody has joined in it yet
        self.triggers.steps_left -= 1
        if not running:
            self.plan, self.plan_ids = None, frozenset()
            return None
        reason = self.triggers.reason(self.plan, self.plan_ids, running, cap)
        result = None
        if reason is not None:
            self.counters[f"trigger_{reason}"] += 1
            # A finish frees device room the solve gives back to the others (fewer host layers,
            # shorter steps for everyone after): re-solved, not held. Holding there cost the
            # pressure family 13 % goodput (docs/results.md, stop 41).
            finished = reason == "batch" and frozenset(v.request_id for v in running) < self.plan_ids
            hold = self.placement_hold and reason != "capacity" and not finished
            held = self.solve_loop.held(self.plan, running, cap) if hold else None
            missed = ttft_missed_ids(running)
            on_time = held is not None and not held.violations - missed
            # a plan solved ahead for this batch (by the central planner or the local thread): at
            # a window's end, when the batch shrank as predicted (a finish at max_tokens; other batch
            # changes void the prediction, counted when the next one replaces it), and on drift only
            # to be weighed against the plan in force (below, on the refitted model: the plan was
            # solved on the model before the drift)
            key = batch_key(running)
            ready = self.ahead.take(key) if reason == "window" or (reason == "drift" and on_time) or (
                reason == "batch" and self.ahead.pending(key)) else None
            if ready is not None:
                ready_plan, ready_paused = ready  # a (plan, paused) pair, or the central planner's PlanResult
                ready = (ready_plan, list(ready_paused))
            if on_time:
                # The plan in force is on time: a ready plan is taken only when it moves no KV (the
                # same placement, at the window its solver chose) or buys late gaps back.
                solved = (held, [])
                if ready is not None and ((not ready[1] and ready[0].distances == held.distances)
                                          or not self.solve_loop.holds_better(held, ready, running, cap, missed)):
                    solved = ready
            else:
                solved = ready if ready is not None else self.ahead.solve_now(running, cap, self._protected)
                if held is not None and self.solve_loop.holds_better(held, solved, running, cap, missed):
                    solved = (held, [])  # the new placement buys no late gap back: no move
            self.counters["ahead_plans_held_over"] += ready is not None and solved[0] is held
            plan, paused = solved
            self.counters["plans_held"] += plan is held
            result = self._install(plan, running, paused)
        self.triggers.predict(self.plan, running, cap)
        self._bank = self._bank_targets(running)
        self.triggers.solve_ahead(running, cap, self._protected)
        return result

    def _prefill_debt_s(self, views: list[RequestView]) -> float:
        return prefill_debt_s(views, self.num_layers, self.cost)

    def _bank_targets(self, running: list[RequestView]) -> dict[str, int]:
        """Token-Deposit: per planned request, the tokens that cover the stalls predicted
        (`deposit.bank_target`): the plan's step above the request's SLO over its window, the
        prefill the batch still owes, the prefills of the arrivals forecast from the recent ones
        over the longest plan window (`deposit.ArrivalForecast`: arrivals are not in the plan's
        inputs), and the chunks of an arrival waiting for these banks (`_waits_for_banks`). 0 where
        none is predicted: on an idle server a stream goes out as produced. The forecast's horizon
        is not the plan's own window: a bank takes steps to fill, and over a plan's short window
        (32 steps, under 1 s at 20-30 ms a step) a rate of an arrival a second or less forecast
        none, so banks stayed empty exactly under the plans that run closest to the SLO
        (bench/README.md, "Where a simulated run's late steps come from")."""
        if not self.uses_deposit or self.plan is None or self.triggers.predicted_s is None:
            return {}
        T, W = self.triggers.predicted_s, self.plan.window
        stalls = [self._prefill_debt_s(running)] + self.arrivals.stalls(self._now, max(self.windows) * T)
        if self._join_stalls is not None:  # an arrival waiting for these banks (`_waits_for_banks`)
            stalls += self._join_stalls[1]
        return {v.request_id: bank_target(T, v.slo_s or self.default_slo_s, min(W, v.max_new_tokens_left),
                                          stalls, self.deposit_pace)
                for v in running if v.request_id in self.plan.distances}

    def deposit_target(self, request_id: str) -> int | None:
        return self._bank.get(request_id, 0)

    def observe(self, stats: StepStats) -> None:
        """Runtime feedback (the cost model learns from every step, `sched/feedback.py`): the
        step's clock, and `RefineTriggers.observe`: a decode-only step that misses the prediction
        by more than the threshold, `drift_patience` times in a row, marks the plan stale
        (re-solved at the next step, on the refitted model)."""
        super().observe(stats)
        self.triggers.observe(stats)

    def request_finished(self, request_id: str) -> None:
        super().request_finished(request_id)
        if self._join_stalls is not None and self._join_stalls[0] == request_id:
            self._join_stalls = None
        self._refused.pop(request_id, None)
        self._protected -= {request_id}

    def close(self) -> None:
        self.ahead.close()

    def num_solves(self) -> int:
        """Solves here that ran the solver's search (`SolveLoop.solves_searched`): a batch that fits
        on device whole is planned with no search (`problem.fit_whole_plan`), in microseconds."""
        return self.solve_loop.solves_searched

    def plan_solver(self) -> str | None:
        return None if self.plan is None else self.plan.solver

    def metrics(self) -> dict[str, float]:
        solver = {f"solver_{k}": v for k, v in self.solver.stats.items()}
        return {**super().metrics(), **self.counters, **self.ahead.stats, **solver,
                "solves_searched": self.solve_loop.solves_searched, "cost_model_fits": self.cost.num_fits}


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
    """Ablation: every re-plan (window's end, drift, batch change) re-places the batch as solved, even
    when the plan in force holds."""

    name = "orbitflow-no-hold"
    placement_hold = False



@register_policy
class OrbitFlowTiesJoin(OrbitFlow):
    """Ablation: a join that ties on goodput misses joins, whatever late steps it brings those whose
    TTFT is missed."""

    name = "orbitflow-ties-join"
    everyone_breaks_ties = False


@register_policy
class OrbitFlowFifoQueue(OrbitFlow):
    """Ablation: the queue is offered in arrival order only; a request whose TTFT SLO is lost holds
    those behind it (no `SloAdmission.step_aside`)."""

    name = "orbitflow-fifo-queue"
    step_aside = False


@register_policy
class OrbitFlowPauseSlack(OrbitFlow):
    """Variant: a pause counts as its request's miss only when its wait outruns its TPOT slack."""

    name = "orbitflow-pause-slack"
    pause_cost = "slack"
