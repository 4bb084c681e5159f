"""The central planner's logic, without Ray: worker telemetry in; versioned plans and routing
advice out.

Each worker runs the same KV policy locally (its plans for unpredictable events: arrivals,
finishes, capacity). The central planner solves the predictable ones for every worker (a plan
window running out, measured drift), one step ahead, from the worker's own view and fitted cost
model, and tells the router how much SLO damage a new request would do on each worker. It keeps
only the latest report of each worker: nothing else, so a restarted planner is whole again after
one report per worker.
"""

from __future__ import annotations

import itertools
import logging
import time

from orbitflow_ray.costmodel.linear import OnlineCostModel
from orbitflow_ray.planner.ahead import RemotePlan
from orbitflow_ray.planner.base import KVPolicy, RequestView, make_policy
from orbitflow_ray.serving.messages import PolicySpec, RoutingAdvice, SolveRequest, WorkerTelemetry

log = logging.getLogger(__name__)

# Prompt lengths the planner probes for routing advice: a geometric ladder over the long-context
# range, so the router can look up any prompt's damage with one comparison.
PROBE_TOKENS = (256, 1024, 4096, 16384, 65536)


class CentralPlanner:
    def __init__(self, probe_tokens: tuple[int, ...] = PROBE_TOKENS, probe_max_tokens: int = 128,
                 stale_after_s: float = 30.0) -> None:
        if not probe_tokens or list(probe_tokens) != sorted(probe_tokens) or probe_max_tokens < 1:
            raise ValueError("probe_tokens must be ascending and non-empty; probe_max_tokens >= 1")
        self.probe_tokens, self.probe_max_tokens = tuple(probe_tokens), probe_max_tokens
        self.stale_after_s = stale_after_s
        self.workers: dict[str, WorkerTelemetry] = {}
        self._heard: dict[str, float] = {}  # planner-clock receive time (worker clocks may be skewed)
        self._policies: dict[str, tuple[PolicySpec, KVPolicy]] = {}
        self._versions = itertools.count(1)
        self.started_at = time.time()
        self.stats = {"reports": 0, "solves": 0, "solve_s_total": 0.0, "solve_s_max": 0.0,
                      "solve_errors": 0, "probes": 0, "probe_s_total": 0.0}

    def _policy(self, worker_id: str, spec: PolicySpec, cost_model) -> KVPolicy:
        """This worker's policy copy (kept across calls for the solver's warm start), on its model."""
        held = self._policies.get(worker_id)
        if held is None or held[0] != spec:
            options = dict(spec.options, solve_ahead=False)
            policy = make_policy(spec.name, spec.num_layers, cost_model=OnlineCostModel(cost_model), **options)
            held = (spec, policy)
            self._policies[worker_id] = held
        cost = getattr(held[1], "cost", None)
        if cost is not None:
            cost.model = cost_model
        return held[1]

    # ---- worker -> planner -----------------------------------------------------------------------
    def report(self, t: WorkerTelemetry) -> RoutingAdvice:
        """Take a worker's state; answer with its routing advice."""
        self.workers[t.worker_id] = t
        self._heard[t.worker_id] = time.time()
        self.stats["reports"] += 1
        self._forget_stale()
        policy = self._policy(t.worker_id, t.policy, t.cost_model)
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
        return RoutingAdvice(next(self._versions), self.probe_tokens, tuple(damage), time.time())

    def solve(self, req: SolveRequest) -> RemotePlan:
        """Solve one worker's predicted batch with its own policy and cost model."""
        policy = self._policy(req.worker_id, req.policy, req.cost_model)
        solve_for = getattr(policy, "solve_for", None)
        if solve_for is None:
            raise ValueError(f"policy {req.policy.name!r} does not plan; nothing to solve")
        t0 = time.perf_counter()
        try:
            result = solve_for(list(req.views), req.capacity, req.pinned)
        except Exception:
            self.stats["solve_errors"] += 1
            raise
        dt = time.perf_counter() - t0
        self.stats["solves"] += 1
        self.stats["solve_s_total"] += dt
        self.stats["solve_s_max"] = max(self.stats["solve_s_max"], dt)
        return RemotePlan(next(self._versions), req.key, result)

    def _forget_stale(self) -> None:
        """Drop workers that stopped reporting (dead replicas, scaled down)."""
        cutoff = time.time() - self.stale_after_s
        for wid in [w for w, heard in self._heard.items() if heard < cutoff]:
            del self.workers[wid], self._heard[wid]
            self._policies.pop(wid, None)

    # ---- views for operators -------------------------------------------------------------------
    def state(self) -> dict:
        """A JSON-friendly summary: per worker, what it last reported (no prompt text)."""
        now = time.time()
        workers = {}
        for wid, t in sorted(self.workers.items()):
            workers[wid] = {
                "age_s": round(now - self._heard[wid], 3), "policy": t.policy.name,
                "running": len(t.running), "waiting": t.num_waiting, "paused": t.num_paused,
                "context_tokens": sum(v.num_tokens for v in t.running),
                "plan_version": int(t.policy_stats.get("plan_version", 0)),
                "remote_plans_used": int(t.policy_stats.get("remote_plans_used", 0)),
                "mean_step_s": t.mean_step_s, **t.kv,
            }
        return {"uptime_s": round(now - self.started_at, 3), "workers": workers, "stats": dict(self.stats)}


class InProcessPlanner:
    """A `PlannerClient` over a CentralPlanner in this process (tests, single-process serving)."""

    def __init__(self, planner: CentralPlanner | None = None) -> None:
        self.planner = planner or CentralPlanner()

    async def report(self, telemetry: WorkerTelemetry) -> RoutingAdvice:
        return self.planner.report(telemetry)

    async def solve(self, request: SolveRequest) -> RemotePlan:
        return self.planner.solve(request)
