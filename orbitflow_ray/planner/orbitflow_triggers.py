"""OrbitFlow's refinement triggers: when the plan in force is re-solved, and what is solved ahead.

A plan holds for its window of W decode steps (`steps_left` counts them down); `reason` names why
the batch must be re-planned at this step:

- "batch":    the batch changed (admission, finish, pause, resume, preemption) -> the plan solved ahead for
              this batch if ready (a finish at max_tokens), else solved on the spot
- "capacity": the next step's growth does not fit the free device blocks   -> solved on the spot
- "window":   the window ran out                     -> the plan solved ahead for this batch, if ready
- "drift":    measured decode steps missed the prediction (`observe`)  -> likewise; else on the spot

`predict` keeps the plan's step time at the current contexts (`predicted_s`), which `observe`
compares each decode-only step against: `drift_patience` misses by more than `drift_threshold` in a
row mark the plan stale. `solve_ahead` submits the batch predicted at the next predictable re-plan
(the window's last step, or the first finish at max_tokens if sooner: every request that many
tokens longer, those finished by then gone) to the policy's `ahead.AheadSolver` once it is
`lead_steps` or fewer away: one step for the local thread, the measured round trip in
steps for a central planner. In: `RequestView`s, `CapacityView`, `StepStats` and the plan in force
(a `problem.Plan`); out: a trigger name, the predicted step time, and solves submitted ahead.
Whether a re-plan keeps the plan in force instead (every reason but "capacity" and a finish, when it
is still on time) is the policy's (`OrbitFlow.replan`, `placement_hold`).
"""

from __future__ import annotations

from dataclasses import replace

from orbitflow_ray.costmodel import OnlineCostModel
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner.ahead import AheadSolver
from orbitflow_ray.planner.base import CapacityView, RequestView, StepStats
from orbitflow_ray.planner.orbitflow_solve import SolveLoop
from orbitflow_ray.planner.problem import Plan


def batch_key(views: list[RequestView]) -> tuple:
    """What a plan solved ahead is for: the batch's (request id, tokens) pairs, sorted."""
    return tuple(sorted((v.request_id, v.num_tokens) for v in views))


def covers(solved_for: tuple, key: tuple) -> bool:
    """Whether a plan solved ahead for batch key `solved_for` holds for the batch `key`: the same
    requests, none with more tokens than it was solved for (KV bytes and step time only grow with
    the contexts, so what fits and is on time there is here: `ahead.AheadSolver.take`)."""
    return len(solved_for) == len(key) and all(
        a[0] == b[0] and a[1] >= b[1] for a, b in zip(solved_for, key))


def advance(v: RequestView, steps: int = 1) -> RequestView:
    """The view `steps` decode steps later (the batch a plan asked for ahead will run on)."""
    return replace(v, num_tokens=v.num_tokens + steps, num_output_tokens=v.num_output_tokens + steps)


class RefineTriggers:
    """The window countdown, the drift detector and the solve-ahead requests of one OrbitFlow
    policy (see the module docstring). `loop` judges the plan's step (`SolveLoop.judged_step_s`),
    `ahead` solves ahead; `drift_threshold` is a relative error, `drift_patience` a step count."""

    def __init__(self, num_layers: int, cost: OnlineCostModel, loop: SolveLoop, ahead: AheadSolver,
                 drift_threshold: float, drift_patience: int) -> None:
        self.num_layers, self.cost, self.loop, self.ahead = num_layers, cost, loop, ahead
        self.drift_threshold, self.drift_patience = drift_threshold, drift_patience
        self.steps_left = 0  # decode steps left in the plan's window
        self.stale = False  # drift: re-solve one step ahead
        self._drift_run = 0
        self.predicted_s: float | None = None  # the plan's step time at the current contexts (s)
        self.step_s: float | None = None  # EWMA of measured decode-step time (solve-ahead budgets)
        self._anchor: tuple[Plan, int, float] | None = None  # (plan, batch context, T) at install

    def installed(self, plan: Plan) -> None:
        """A plan was installed: its window starts, drift is forgotten."""
        self.steps_left = plan.window
        self.stale, self._drift_run = False, 0

    def reason(self, plan: Plan | None, plan_ids: frozenset[str], running: list[RequestView],
               cap: CapacityView) -> str | None:
        """Why the batch is re-planned at this step ("batch", "capacity", "window", "drift"), or None."""
        if plan is None or frozenset(v.request_id for v in running) != plan_ids:
            return "batch"
        if self.growth_blocks(running, cap) > cap.device_free_blocks:
            return "capacity"
        if self.steps_left <= 0:
            return "window"
        if self.stale:
            return "drift"
        return None

    @staticmethod
    def growth_blocks(running: list[RequestView], cap: CapacityView) -> int:
        """Device blocks the next step allocates: one per device layer of a request at a block edge."""
        bs = cap.block_size
        return sum(sum(t == Tier.DEVICE for t in v.placement or ()) for v in running if v.num_tokens % bs == 0)

    def predict(self, plan: Plan | None, running: list[RequestView], cap: CapacityView) -> None:
        """The plan's step time at the current contexts: T at install, plus the attention cost of
        the tokens added since (the stall's growth is second order next to the drift threshold)."""
        if plan is None:
            self.predicted_s = None
            return
        ctx = sum(v.num_tokens for v in running if v.request_id in plan.distances)
        if self._anchor is None or self._anchor[0] is not plan:
            views = [v for v in running if v.request_id in plan.distances]  # paused ones leave
            inputs = self.loop.inputs(views, cap)
            T = self.loop.judged_step_s(inputs, [plan.distances[v.request_id] for v in views])
            self._anchor = (plan, ctx, T)
        _, ctx0, T0 = self._anchor
        self.predicted_s = T0 + self.num_layers * self.cost.model.compute_b_s_per_token * (ctx - ctx0)

    def observe(self, stats: StepStats) -> None:
        """A decode-only step's wall time feeds the solve-ahead budget's EWMA; one that misses the
        prediction by more than `drift_threshold`, `drift_patience` times in a row, marks the plan
        stale."""
        if stats.num_decodes and stats.new_tokens == stats.num_decodes:  # what solving ahead budgets
            self.step_s = stats.wall_s if self.step_s is None else 0.8 * self.step_s + 0.2 * stats.wall_s
        pred = self.predicted_s
        if pred is None or stats.new_tokens != stats.num_decodes or pred <= 0:
            return
        if abs(stats.wall_s / pred - 1) > self.drift_threshold:
            self._drift_run += 1
            if self._drift_run >= self.drift_patience:
                self.stale = True
                self._drift_run = 0
        else:
            self._drift_run = 0

    def solve_ahead(self, running: list[RequestView], cap: CapacityView, protected: frozenset[str]) -> None:
        """Ask for the plan of the next predictable re-plan (the window's last step, or the first
        finish at max_tokens if sooner; the next step on drift) now if it is `lead_steps` or fewer
        away (one step for the local thread; the central planner's round trip in steps otherwise),
        for the batch predicted there: every request `ahead` tokens longer, those finished by then
        gone."""
        ahead = 1 if self.stale else min(self.steps_left, min(v.max_new_tokens_left for v in running))
        if ahead < 1 or ahead > self.ahead.lead_steps(self.step_s, ahead):
            return
        nxt = [advance(v, ahead) for v in running if v.max_new_tokens_left > ahead]
        if nxt and not self.ahead.pending(batch_key(nxt)):
            budget = None if self.step_s is None else ahead * self.step_s
            self.ahead.submit(batch_key(nxt), nxt, cap, protected, budget_s=budget)
