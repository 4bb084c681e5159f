"""The central planner at scale, by content: solve requests asked for ahead, coalesced reports,
superseded and expired solve requests, and which plan each worker adopts. Fake workers (an
OrbitFlow policy over hand-built views, no engine) and a fake clock; the queue is driven by hand.

Run: .venv/bin/python -m pytest -q tests/test_plan_queue.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from orbitflow_ray.costmodel.linear import default_prior
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner.ahead import AheadSolver
from orbitflow_ray.planner.base import CapacityView, RequestView, StepStats, make_policy
from orbitflow_ray.planner.planning import PlanResult, RemotePlan, planning_of
from orbitflow_ray.serving.central import CentralPlanner
from orbitflow_ray.serving.messages import PolicySpec, SolveRequest, WorkerTelemetry
from orbitflow_ray.serving.plan_queue import PlanQueue

L, WINDOW, STEP_S = 4, 4, 0.01
CAP = CapacityView(L, 16, 16 * 4 * 64, 200, 150, 1000, 1000)
OPTIONS = {"slo_s": 0.05, "windows": (WINDOW,), "solve_ahead": False, "drift_threshold": 1e9}
SPEC = PolicySpec.of("orbitflow", L, OPTIONS)
COST = default_prior(L, None, "cpu")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeWorker:
    """A worker's policy stepping a hand-built batch: every step each request gains one token."""

    def __init__(self, wid: str, queue: PlanQueue, n: int = 3, **options) -> None:
        self.wid, self.queue = wid, queue
        self.policy = make_policy("orbitflow", L, **{**OPTIONS, **options})
        self.views = [RequestView(f"{wid}-r{i}", 300 + 50 * i, 300, 1000, 0.0, (Tier.DEVICE,) * L, 0, 0.05)
                      for i in range(n)]
        self.sent: list[SolveRequest] = []
        self.answers: list = []
        planning_of(self.policy).attach_remote(self.remote)

    def remote(self, key, views, cap, pinned, budget_s):
        req = SolveRequest(self.wid, key, tuple(views), cap, frozenset(pinned), COST, SPEC, budget_s)
        self.sent.append(req)
        fut = self.queue.solve(req)
        self.answers.append(fut)
        return fut

    def step(self) -> None:
        self.views = [v for v in self.views if v.num_output_tokens < v.max_tokens]  # finished at max_tokens
        ids = tuple(v.request_id for v in self.views)
        self.policy.observe(StepStats(0, STEP_S, ids, sum(v.num_tokens for v in self.views), len(ids), len(ids)))
        change = self.policy.replan(self.views, CAP)
        for rid, tiers in (change.placements.items() if change else ()):
            self.views = [replace(v, placement=tuple(tiers)) if v.request_id == rid else v for v in self.views]
        self.views = [replace(v, num_tokens=v.num_tokens + 1, num_output_tokens=v.num_output_tokens + 1)
                      for v in self.views]

    def telemetry(self) -> WorkerTelemetry:
        return WorkerTelemetry(self.wid, 0.0, SPEC, tuple(self.views), 0, 0, CAP, COST, 2048)

    @property
    def stats(self) -> dict:
        return self.policy.ahead.stats


def test_workers_adopt_the_central_plan_for_their_batch_and_drop_what_is_stale():
    # Workers that re-place at every window's end (placement_hold off): the central plan, back in
    # time for the batch running, is the one installed.
    clock = Clock()
    planner = CentralPlanner(probe_tokens=(16, 64), solver="fast")
    queue = PlanQueue(planner, clock)
    a, b, c = (FakeWorker(w, queue, placement_hold=False) for w in "abc")

    b.step()  # installs a local plan, then asks for its window's last step right away (no round trip yet)
    assert len(b.sent) == 1 and b.sent[0].budget_s == pytest.approx(WINDOW * STEP_S)
    assert b.sent[0].key == tuple(sorted((v.request_id, v.num_tokens + WINDOW - 1) for v in b.views))
    clock.now += WINDOW * STEP_S + 0.001  # b's request waits past its budget

    a.step()
    a.views = a.views[:2]  # a request of a finishes: a new batch, a new plan, a new prediction
    a.step()
    assert len(a.sent) == 2 and a.answers[0].done()  # the first is answered at once, unsolved
    assert a.answers[0].result().dropped == "superseded" and a.answers[0].result().result is None
    c.step()
    reports = [queue.report(c.telemetry()) for _ in range(3)]  # c reports thrice while the planner is busy
    assert queue.waiting() == (1, 3)

    while queue.run_once():
        pass
    assert b.answers[0].result().dropped == "expired"
    solved = {w.wid: w.answers[-1].result() for w in (a, c)}
    assert all(isinstance(p.result, PlanResult) and p.dropped is None for p in solved.values())
    advice = {f.result().version for f in reports}
    assert len(advice) == 1  # one answer for the three reports...
    assert planner.stats["reports"] == 1 and planner.stats["probes"] == 2  # ...from one probe run
    assert (planner.stats["reports_coalesced"], planner.stats["solves_superseded"],
            planner.stats["solves_expired"], planner.stats["solves"]) == (2, 1, 1, 2)

    for w in (a, b, c):
        for _ in range(WINDOW):  # the last of these ends the window: the central plan is taken
            w.step()             # if it is back, for this batch
    for w in (a, c):
        assert w.policy.plan is solved[w.wid].result.plan  # adopted the central plan for its batch
        assert w.stats["remote_plans_used"] == 1 and w.stats["plan_version"] == solved[w.wid].version
    assert a.stats["remote_plans_replaced"] == 1  # its first prediction, void once the batch changed
    assert b.stats["remote_plans_used"] == 0 and b.stats["remote_plans_dropped"] == 1
    assert b.stats["plan_version"] == 0 and b.policy.plan.solver == "fast"  # solved on the spot
    assert a.stats["remote_round_trip_s"] > 0 and b.stats["remote_round_trip_s"] == 0.0


def _solve_all(queue: PlanQueue) -> None:
    while queue.run_once():
        pass


def test_the_batch_after_a_finish_at_max_tokens_is_solved_ahead_and_taken_there():
    queue = PlanQueue(CentralPlanner(probe_tokens=(16,), solver="fast"), Clock())
    w = FakeWorker("f", queue, n=3, placement_hold=False, windows=(16,))
    w.views[0] = replace(w.views[0], max_tokens=3)  # finishes after three steps, inside the window
    w.step()  # installs a local plan and asks for the batch right after that finish
    assert len(w.sent) == 1
    assert w.sent[0].key == tuple(sorted((v.request_id, v.num_tokens + 2) for v in w.views[1:]))
    _solve_all(queue)
    w.step(), w.step()
    assert w.stats["remote_plans_used"] == 0 and len(w.views) == 3
    w.step()  # f-r0 is gone: the batch changed as predicted, the central plan is taken
    assert len(w.views) == 2 and w.stats["remote_plans_used"] == 1
    assert w.policy.plan is w.answers[0].result().result.plan and w.policy.counters["trigger_batch"] == 2


def _drifted_worker(**options) -> FakeWorker:
    """A worker whose window-end plan came back from the central planner, then whose measured
    steps drifted from the prediction two steps before that window's end."""
    queue = PlanQueue(CentralPlanner(probe_tokens=(16,), solver="fast"), Clock())
    w = FakeWorker("d", queue, n=3, **options)
    w.step()  # asks for the window's last step
    _solve_all(queue)
    w.policy.triggers.stale = True
    w.step()  # the drift re-plan: the batch's requests, shorter than the plan was solved for
    assert w.policy.counters["trigger_drift"] == 1
    assert w.stats["remote_plans_other_batch"] == w.stats["remote_plans_late"] == 0
    return w


def test_a_drift_replan_weighs_the_central_plan_for_the_window_end_against_the_plan_in_force():
    w = _drifted_worker()  # placement_hold: the plan in force is on time; the central plan moves KV
    assert w.stats["remote_plans_used"] == 1 and w.policy.counters["ahead_plans_held_over"] == 1
    assert w.policy.plan is not w.answers[0].result().result.plan  # weighed on the refitted model: kept


def test_a_drift_replan_without_hold_solves_on_the_refitted_model():
    w = _drifted_worker(placement_hold=False)  # nothing would weigh the central plan: not taken
    assert w.stats["remote_plans_used"] == 0 and w.policy.plan.solver == "fast"
    assert w.policy.plan is not w.answers[0].result().result.plan


def test_lead_steps_follow_the_measured_round_trip():
    ahead = AheadSolver(lambda *a: None, background=False)
    assert ahead.lead_steps(0.01, 32) == 1  # the local thread: one step ahead
    ahead.attach_remote(lambda *a, **k: None)
    assert ahead.lead_steps(0.01, 32) == 32  # nothing measured yet: as early as the window allows
    ahead.round_trip_s = 0.25
    assert ahead.lead_steps(0.125, 32) == 4  # ceil(1.5 x 0.25 / 0.125) + 1
    assert ahead.lead_steps(0.001, 32) == 32 and ahead.stats["remote_lead_steps"] == 32


def test_a_newer_solve_supersedes_and_solves_go_earliest_deadline_first():
    clock = Clock()
    planner = CentralPlanner(probe_tokens=(16,), solver="fast")
    queue = PlanQueue(planner, clock)
    views = FakeWorker("x", queue).views
    order = []
    for wid, budget in (("late", 5.0), ("soon", 1.0), ("none", None)):
        req = SolveRequest(wid, (wid,), tuple(views), CAP, frozenset(), COST, SPEC, budget)
        queue.solve(req).add_done_callback(lambda f: order.append(f.result().key))
    queue.report(WorkerTelemetry("late", 0.0, SPEC, tuple(views), 0, 0, CAP, COST, 2048))
    while queue.run_once():
        pass
    assert order == [("soon",), ("late",), ("none",)] and planner.stats["reports"] == 1
    with pytest.raises(ValueError, match="does not plan"):
        planner.solve(SolveRequest("y", 1, tuple(views), CAP, frozenset(), COST, PolicySpec.of("no-offload", L, {})))
    assert isinstance(planner.dropped(SolveRequest("y", 1, (), CAP, frozenset(), COST, SPEC), "expired"), RemotePlan)


def test_a_report_waiting_too_long_goes_before_the_solves():
    clock = Clock()
    planner = CentralPlanner(probe_tokens=(16,), solver="fast")
    queue = PlanQueue(planner, clock, report_max_wait_s=1.0)
    views = FakeWorker("x", queue).views
    order = []
    queue.report(WorkerTelemetry("r", 0.0, SPEC, tuple(views), 0, 0, CAP, COST, 2048)).add_done_callback(
        lambda f: order.append("report"))
    for wid in ("s1", "s2"):
        req = SolveRequest(wid, (wid,), tuple(views), CAP, frozenset(), COST, SPEC, 10.0)
        queue.solve(req).add_done_callback(lambda f: order.append(f.result().key[0]))
    queue.run_once()
    clock.now += 1.5  # the report has waited past its limit: it goes next
    while queue.run_once():
        pass
    assert order == ["s1", "report", "s2"]
    with pytest.raises(ValueError, match="report_max_wait_s"):
        PlanQueue(planner, report_max_wait_s=0)


def test_a_report_of_the_same_batch_reuses_the_last_probes():
    planner = CentralPlanner(probe_tokens=(16, 64), solver="fast")
    w = FakeWorker("w", PlanQueue(planner))
    first = planner.report(w.telemetry())
    again = planner.report(w.telemetry())
    assert again.damage == first.damage and again.version > first.version
    assert planner.stats["probes"] == 2 and planner.stats["probes_reused"] == 1
    w.views = w.views[:1]  # a finish: a new batch, probed again
    planner.report(w.telemetry())
    assert planner.stats["probes"] == 4 and planner.stats["probes_reused"] == 1


def test_a_plan_on_time_is_held_over_a_central_plan_that_would_move_kv():
    # placement_hold (the default): at the window's end the plan in force is on time, so a central
    # plan that re-places KV is taken but not adopted (its copies would make a step late for the
    # whole batch); with the hold off, the same central plan is installed.
    installed = {}
    for hold in (True, False):
        clock = Clock()
        queue = PlanQueue(CentralPlanner(probe_tokens=(16, 64), solver="fast"), clock)
        w = FakeWorker("c", queue, placement_hold=hold)
        w.step()
        while queue.run_once():
            pass
        central = w.answers[-1].result().result.plan
        in_force = w.policy.plan
        for _ in range(WINDOW):
            w.step()
        assert w.stats["remote_plans_used"] == 1  # back in time for this batch either way
        installed[hold] = (w.policy.plan, central, in_force, w.policy.counters["ahead_plans_held_over"])
    plan, central, in_force, held_over = installed[True]
    assert central.distances != in_force.distances  # the central plan moves KV...
    # ...so the plan in force is kept (shrunk a class where the batch outgrew it), not the central one
    assert plan is not central and plan.distances != central.distances and held_over == 1
    assert all(plan.distances[r] <= d for r, d in in_force.distances.items())
    plan, central, _, held_over = installed[False]
    assert plan is central and held_over == 0
