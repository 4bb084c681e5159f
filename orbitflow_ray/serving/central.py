"""The central planner's logic, without Ray: worker telemetry in; versioned plans and routing
advice out.

Each worker runs the same KV policy locally, with the fast path (its plans for unpredictable
events: arrivals, finishes, capacity). The central planner solves the predictable ones for every
worker (a plan window running out, measured drift), for the batch the worker predicts at the step
that needs the plan, from the worker's own view and fitted cost model, with `solver`
("cvxpy-highs" by default: the fast plan, warm-started from the worker's plan in force, improved
by the compact cvxpy ILP, cut short by the worker's budget, and never worse than it;
`planner/ilp_compact.py`); Pause-Resume decisions come from the same solve loop. It also tells
the router how much SLO damage a new request would do on each worker: those probes run the fast
path on a separate policy copy, so they neither cost ILP solves nor overwrite the ILP's warm
start, and a report of an unchanged batch reuses them. It keeps only the latest report of each
worker (and the policy copies built from it), so a restarted planner is whole again after one
report per worker. `plan_queue.PlanQueue` orders and coalesces the calls in front of it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque

import numpy as np

from orbitflow_ray.costmodel.linear import OnlineCostModel
from orbitflow_ray.planner.base import KVPolicy, RequestView, make_policy
from orbitflow_ray.planner.planning import RemotePlan, planning_of
from orbitflow_ray.planner.solvers import SolverKind
from orbitflow_ray.serving.messages import PolicySpec, RoutingAdvice, SolveRequest, WorkerTelemetry

log = logging.getLogger(__name__)

# Prompt lengths the planner probes for routing advice: a geometric ladder over the long-context
# range, so the router can look up any prompt's damage with one comparison.
PROBE_TOKENS = (256, 1024, 4096, 16384, 65536)
DEADLINE_SHARE = 0.8  # of a solve request's budget the ILP may use; the rest is the trip back


class CentralPlanner:
    def __init__(self, probe_tokens: tuple[int, ...] = PROBE_TOKENS, probe_max_tokens: int = 128,
                 stale_after_s: float = 30.0, solver: str = "cvxpy-highs", probe_reuse_s: float = 2.0) -> None:
        if not probe_tokens or list(probe_tokens) != sorted(probe_tokens) or probe_max_tokens < 1:
            raise ValueError("probe_tokens must be ascending and non-empty; probe_max_tokens >= 1")
        SolverKind(solver)  # ValueError on an unknown solver, here rather than at the first solve
        self.solver = solver
        self.probe_tokens, self.probe_max_tokens = tuple(probe_tokens), probe_max_tokens
        self.stale_after_s = stale_after_s
        self.probe_reuse_s = probe_reuse_s
        # worker -> (probe signature, when probed, damage): a report of the same batch with about
        # the same free room within probe_reuse_s is answered from it, without probing again
        self._probed: dict[str, tuple[tuple, float, tuple[float, ...]]] = {}
        self.workers: dict[str, WorkerTelemetry] = {}
        self._heard: dict[str, float] = {}  # planner-clock receive time (worker clocks may be skewed)
        # (worker, solver) -> (spec, policy copy): one for plans, one on the fast path for probes
        self._policies: dict[tuple[str, str], tuple[PolicySpec, KVPolicy]] = {}
        self._versions = itertools.count(1)
        self.started_at = time.time()
        self._solve_s: deque[float] = deque(maxlen=1000)  # recent solve times, for percentiles
        self.stats = {"reports": 0, "solves": 0, "solve_s_total": 0.0, "solve_s_max": 0.0,
                      "solve_errors": 0, "probes": 0, "probe_s_total": 0.0, "probes_reused": 0,
                      # plan_queue.PlanQueue: reports merged into a waiting one, solve requests
                      # dropped unsolved (replaced by a newer one, or past their budget)
                      "reports_coalesced": 0, "solves_superseded": 0, "solves_expired": 0}
        self.plans_by_solver: dict[str, int] = {}  # central plans by the solver that made them

    def _policy(self, worker_id: str, spec: PolicySpec, cost_model, solver: str) -> KVPolicy:
        """This worker's policy copy for `solver` (kept across calls for the solver's warm start),
        on its model."""
        held = self._policies.get((worker_id, solver))
        if held is None or held[0] != spec:
            options = dict(spec.options, solve_ahead=False, solver=solver)
            policy = make_policy(spec.name, spec.num_layers, cost_model=OnlineCostModel(cost_model), **options)
            held = (spec, policy)
            self._policies[(worker_id, solver)] = held
        planning = planning_of(held[1])
        if planning is not None:
            planning.use_cost_model(cost_model)
        return held[1]

    # ---- worker -> planner -----------------------------------------------------------------------
    def report(self, t: WorkerTelemetry) -> RoutingAdvice:
        """Take a worker's state; answer with its routing advice."""
        self.workers[t.worker_id] = t
        self._heard[t.worker_id] = time.time()
        self.stats["reports"] += 1
        self._forget_stale()
        sig = _probe_signature(t)
        held = self._probed.get(t.worker_id)
        if held is not None and held[0] == sig and time.time() - held[1] < self.probe_reuse_s:
            self.stats["probes_reused"] += 1  # same batch, about the same room: the same answer
            return RoutingAdvice(next(self._versions), self.probe_tokens, held[2], time.time())
        policy = self._policy(t.worker_id, t.policy, t.cost_model, "fast")
        policy.remote_prefill_load = t.prefill_load
        t0 = time.perf_counter()
        fit = [n for n in self.probe_tokens if n < t.max_model_len]  # longer ones can never run: inf
        probes = [RequestView(f"probe-{n}", n, n, self.probe_max_tokens, time.perf_counter(), None, 0,
                              None, 0, None, 0) for n in fit]
        try:
            fitting = policy.admission_damage(probes, list(t.running), t.capacity)
        except Exception:  # advice is best effort: a failed probe must not fail the report
            log.exception("routing probes failed for worker %s", t.worker_id)
            fitting = [float("inf")] * len(probes)
        damage = fitting + [float("inf")] * (len(self.probe_tokens) - len(fit))
        dt = time.perf_counter() - t0
        self.stats["probes"] += len(self.probe_tokens)
        self.stats["probe_s_total"] += dt
        self._probed[t.worker_id] = (sig, time.time(), tuple(damage))
        return RoutingAdvice(next(self._versions), self.probe_tokens, tuple(damage), time.time())

    def solve(self, req: SolveRequest, deadline: float | None = None) -> RemotePlan:
        """Solve one worker's predicted batch with its own policy and cost model, on `solver`.
        `deadline` (time.perf_counter()) stops the ILP's wall-clock part; by default
        DEADLINE_SHARE of the request's budget from now (the rest is the trip back)."""
        policy = self._policy(req.worker_id, req.policy, req.cost_model, self.solver)
        policy.remote_prefill_load = req.prefill_load
        planning = planning_of(policy)
        if planning is None:
            raise ValueError(f"policy {req.policy.name!r} does not plan; nothing to solve")
        t0 = time.perf_counter()
        if deadline is None and req.budget_s is not None:
            deadline = t0 + DEADLINE_SHARE * req.budget_s
        try:
            result = planning.solve_for(list(req.views), req.capacity, req.pinned, deadline)
        except Exception:
            self.stats["solve_errors"] += 1
            raise
        dt = time.perf_counter() - t0
        self.stats["solves"] += 1
        self.stats["solve_s_total"] += dt
        self.stats["solve_s_max"] = max(self.stats["solve_s_max"], dt)
        self._solve_s.append(dt)
        made_by = result.plan.solver
        self.plans_by_solver[made_by] = self.plans_by_solver.get(made_by, 0) + 1
        return RemotePlan(next(self._versions), req.key, result, solve_s=dt)

    def dropped(self, req: SolveRequest, why: str) -> RemotePlan:
        """The answer to a solve request dropped unsolved (`plan_queue.PlanQueue`): "expired" or
        "superseded"."""
        self.stats[f"solves_{why}"] += 1
        return RemotePlan(next(self._versions), req.key, None, dropped=why)

    def _forget_stale(self) -> None:
        """Drop workers that stopped reporting (dead replicas, scaled down)."""
        cutoff = time.time() - self.stale_after_s
        for wid in [w for w, heard in self._heard.items() if heard < cutoff]:
            del self.workers[wid], self._heard[wid]
            self._probed.pop(wid, None)
            for key in [k for k in self._policies if k[0] == wid]:
                del self._policies[key]

    # ---- views for operators -------------------------------------------------------------------
    def state(self) -> dict:
        """A JSON-friendly summary: per worker, what it last reported (no prompt text)."""
        now = time.time()
        workers = {}
        heard = dict(self._heard)  # copies: a PlanQueue thread may be updating them
        for wid, t in sorted(dict(self.workers).items()):
            workers[wid] = {
                "age_s": round(now - heard.get(wid, now), 3), "policy": t.policy.name,
                "running": len(t.running), "waiting": t.num_waiting, "paused": t.num_paused,
                "context_tokens": sum(v.num_tokens for v in t.running),
                "plan_version": int(t.policy_stats.get("plan_version", 0)),
                "plan_solver": t.plan_solver,
                **{k: int(t.policy_stats.get(k, 0)) for k in (
                    "remote_plans_used", "remote_plans_late", "remote_plans_other_batch", "remote_plans_dropped",
                    "remote_plans_failed", "remote_plans_replaced", "solves_remote", "remote_lead_steps")},
                "remote_round_trip_s": t.policy_stats.get("remote_round_trip_s", 0.0),
                "mean_step_s": t.mean_step_s, **t.kv,
            }
        return {"uptime_s": round(now - self.started_at, 3), "workers": workers,
                "stats": {**self.stats, **self.solve_summary()}}

    def solve_summary(self) -> dict:
        """The central solves: solver, plans by the solver that made them, recent p50/p99 (s),
        and how the ILP settled them (summed over the workers' policy copies)."""
        times = np.array(list(self._solve_s))
        ilp: dict[str, float] = {}
        for (_, solver), (_, policy) in list(self._policies.items()):
            if solver == self.solver:
                for k, v in policy.metrics().items():
                    if k.startswith("solver_"):
                        ilp[k] = ilp.get(k, 0) + v
        return {"solver": self.solver, "plans_by_solver": dict(self.plans_by_solver),
                "solve_s_p50": float(np.percentile(times, 50)) if len(times) else None,
                "solve_s_p99": float(np.percentile(times, 99)) if len(times) else None, **ilp}


def _probe_signature(t: WorkerTelemetry) -> tuple:
    """What a report's routing advice depends on, coarsely: the policy and model, the batch's
    ids, the queues, and the free device room in 1/32ths of the device."""
    cap = t.capacity
    return (t.policy, t.max_model_len, frozenset(v.request_id for v in t.running), t.num_waiting, t.num_paused,
            cap.device_total_blocks, cap.device_free_blocks * 32 // max(1, cap.device_total_blocks))


class InProcessPlanner:
    """A `PlannerClient` over a CentralPlanner in this process (tests, single-process serving)."""

    def __init__(self, planner: CentralPlanner | None = None) -> None:
        self.planner = planner or CentralPlanner()

    async def report(self, telemetry: WorkerTelemetry) -> RoutingAdvice:
        return self.planner.report(telemetry)

    async def solve(self, request: SolveRequest) -> RemotePlan:
        return self.planner.solve(request)

