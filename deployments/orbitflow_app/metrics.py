"""Prometheus metrics through `ray.util.metrics`, so they reach Ray's metrics endpoint on every
node (port `--metrics-export-port`). All names are prefixed `orbitflow_`; no label ever carries
prompt text. Latencies are what the client sees: TTFT from the ingress's arrival time, TBT and
TPOT on Token-Deposit release times, each computed by `orbitflow_ray.metrics` (one RequestRecord
per finished request); this module only observes them.
"""

from __future__ import annotations

import time

from ray.util.metrics import Counter, Gauge, Histogram

from orbitflow_ray.metrics.slo import RequestRecord
from orbitflow_ray.outputs import RequestOutput
from orbitflow_ray.serving.messages import GenerateRequest, WorkerTelemetry

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class WorkerMetrics:
    def __init__(self, model: str, worker_id: str) -> None:
        self.tags = {"model": model, "worker": worker_id}
        keys = ("model", "worker")
        self.ttft = Histogram("orbitflow_ttft_seconds", "Time to first token (release), from ingress arrival.",
                              _LATENCY_S, keys)
        self.tpot = Histogram("orbitflow_tpot_seconds", "Mean time per output token after the first, per request.",
                              _LATENCY_S, keys)
        self.tbt = Histogram("orbitflow_tbt_seconds", "Time between consecutive released tokens.", _LATENCY_S, keys)
        self.slo = Counter("orbitflow_slo_requests_total", "Finished requests by SLO kind and outcome.",
                           keys + ("slo", "outcome"))
        self.tokens = Counter("orbitflow_generated_tokens_total", "Output tokens produced.", keys)
        self.kv_bytes = Gauge("orbitflow_kv_bytes", "KV bytes in use per tier.", keys + ("tier",))
        self.kv_capacity = Gauge("orbitflow_kv_capacity_bytes", "KV tier capacity.", keys + ("tier",))
        self.link_bytes = Counter("orbitflow_link_bytes_total", "Bytes moved between host and device KV tiers.",
                                  keys + ("direction",))
        self.solves = Counter("orbitflow_plan_solves_total", "Placement solves by where they ran.",
                              keys + ("where",))
        self.solve_s = Counter("orbitflow_plan_solve_seconds_total", "Time spent in placement solves.",
                               keys + ("where",))
        self.plan_version = Gauge("orbitflow_plan_version", "Last central-planner plan version applied.", keys)
        self.central_plans = Counter("orbitflow_central_plans_total",
                                     "Central plans by outcome: used, late (not back by the step), other_batch, "
                                     "dropped (unsolved by the planner: expired or superseded), replaced (the batch changed first).",
                                     keys + ("outcome",))
        self.plan_solver = Gauge("orbitflow_plan_solver", "1 for the solver that made the plan in force.",
                                 keys + ("solver",))
        self._solvers: set[str] = set()
        self.requests = Gauge("orbitflow_requests", "Requests by state.", keys + ("state",))
        self.pauses = Counter("orbitflow_pauses_total", "Pause-Resume pauses.", keys)
        self._last: dict[str, float] = {}

    def on_finish(self, req: GenerateRequest, out: RequestOutput) -> None:
        m = out.metrics
        times = m.release_times or m.token_times
        if not times:
            return
        first_unix = time.time() - (time.perf_counter() - times[0])  # the ingress's clock
        rec = RequestRecord(req.request_id, req.arrival_unix, req.num_prompt_tokens,
                            tuple(first_unix + (t - times[0]) for t in times), m.slo_s or float("inf"),
                            req.params.ttft_slo_s, out.finish_reason != "abort")
        self.ttft.observe(max(0.0, rec.ttft_s), self.tags)
        for gap in rec.tbts:
            self.tbt.observe(float(gap), self.tags)
        if rec.tpot_s is not None:
            self.tpot.observe(rec.tpot_s, self.tags)
        self.tokens.inc(len(out.token_ids), self.tags)
        for kind, met in rec.slo_met().items():
            self.slo.inc(1, {**self.tags, "slo": kind, "outcome": "met" if met else "missed"})

    def on_telemetry(self, t: WorkerTelemetry) -> None:
        kv, ps = t.kv, t.policy_stats
        for tier in ("device", "host"):
            self.kv_bytes.set(kv.get(f"{tier}_kv_bytes_used", 0), {**self.tags, "tier": tier})
            self.kv_capacity.set(kv.get(f"{tier}_kv_bytes_capacity", 0), {**self.tags, "tier": tier})
        self._inc(self.link_bytes, "h2d", kv.get("bytes_h2d", 0), direction="h2d")
        self._inc(self.link_bytes, "d2h", kv.get("bytes_d2h", 0), direction="d2h")
        for where, n, s in (("sync", "solves_sync", "solve_s_sync"), ("ahead", "solves_ahead", "solve_s_ahead")):
            self._inc(self.solves, n, ps.get(n, 0), where=where)
            self._inc(self.solve_s, s, ps.get(s, 0.0), where=where)
        self._inc(self.solves, "remote_plans_used", ps.get("remote_plans_used", 0), where="planner")
        for outcome in ("used", "late", "other_batch", "dropped", "replaced"):
            key = f"remote_plans_{outcome}"
            self._inc(self.central_plans, "central_" + key, ps.get(key, 0), outcome=outcome)
        if t.plan_solver is not None:
            self._solvers.add(t.plan_solver)
            for solver in self._solvers:
                self.plan_solver.set(float(solver == t.plan_solver), {**self.tags, "solver": solver})
        self._inc(self.pauses, "num_pauses", kv.get("num_pauses", 0))
        self.plan_version.set(ps.get("plan_version", 0), self.tags)
        for state, n in (("running", len(t.running)), ("waiting", t.num_waiting), ("paused", t.num_paused)):
            self.requests.set(n, {**self.tags, "state": state})

    def _inc(self, counter: Counter, key: str, total: float, **tags: str) -> None:
        """Counters from the engine's running totals: export the increase since the last report."""
        delta = total - self._last.get(key, 0.0)
        self._last[key] = total
        if delta > 0:
            counter.inc(delta, {**self.tags, **tags})


class PlannerMetrics:
    def __init__(self) -> None:
        self.solves = Counter("orbitflow_planner_solves_total",
                              "Plans solved by the central planner, by the solver that made them.", ("solver",))
        self.solve_s = Histogram("orbitflow_planner_solve_seconds", "Central planner solve time.",
                                 [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 3.0])
        self.reports = Counter("orbitflow_planner_reports_total", "Worker telemetry reports received.")
        self.workers = Gauge("orbitflow_planner_workers", "Workers reporting to the planner.")
