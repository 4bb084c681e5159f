"""The central planner at scale: N fake workers reporting every 0.5 s to one central planner.

Run from the repository root with the project venv:

    .venv/bin/python bench/planner_scale.py                       # 8 workers, 20 s per mode
    .venv/bin/python bench/planner_scale.py --workers 8 --seconds 30 --json runs/planner_scale.json
    .venv/bin/python bench/planner_scale.py --windows 32 --seconds 10    # shorter windows: more re-plans

Each fake worker is the real OrbitFlow policy (fast path on the spot, window re-plans sent to the
central planner) stepping a synthetic batch on its own thread: `--requests` requests of the
llama3.1-8b preset of bench/planner.py (L = 32, 4 KiB of KV per token per layer, contexts
log-uniform 4K-32K, per-token SLOs of {1, 1.5, 2.5} x the no-offload step, device KV for
`--device-frac` of the batch), each step sleeping the plan's predicted step time; every `--churn-s` seconds on
average one request finishes and another arrives (an on-the-spot re-plan). Reports go out every
`--report-s`. The central planner is `CentralPlanner` behind a `PlanQueue` (one planning thread,
the compact cvxpy ILP, coalescing, earliest deadline first) in a child process, reached over a
pipe (as on a cluster, its solves do not hold the workers' GIL).

Two modes, the same workload and seed: `ahead` (what serving runs: the plan is asked for as many
steps ahead as the measured round trip needs) and `one-step` (the baseline: asked one step
before the window ends, as before). Printed per mode: central solve time p50/p99, round trip
(ask -> answer) p50/p99, of the central plans asked for and settled by the end (taken or not at
the step that needed them) the share used in time, late, for another batch, dropped unsolved
by the planner (expired or superseded), or replaced by the worker (its batch changed first); the
share used of those still wanted at their step (`share_used_when_needed`: all but the replaced);
and reports coalesced or answered from the last probes (`probes_reused`). The first
solve of each worker's shape compiles the cvxpy model; it runs before the clock starts. The
workers share one process (their fast-path solves contend for its GIL; `step_ms_mean` shows the
step time they reached).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path[0:0] = [str(Path(__file__).resolve().parent.parent)]

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402

from orbitflow_ray.costmodel.linear import CostModel, OnlineCostModel  # noqa: E402
from orbitflow_ray.kv.blocks import Tier  # noqa: E402
from orbitflow_ray.planner.base import CapacityView, RequestView, StepStats, make_policy  # noqa: E402
from orbitflow_ray.planner.planning import planning_of  # noqa: E402
from orbitflow_ray.serving.central import CentralPlanner  # noqa: E402
from orbitflow_ray.serving.messages import PolicySpec, SolveRequest, WorkerTelemetry  # noqa: E402
from orbitflow_ray.serving.plan_queue import PlanQueue  # noqa: E402

L, KVB, A, B, LINK, BLOCK = 32, 4096, 0.27e-3, 2.4e-9, 25e9, 16
COST = CostModel(L, A, B, 0.0, LINK)
OUTCOMES = ("remote_plans_used", "remote_plans_late", "remote_plans_other_batch", "remote_plans_dropped",
            "remote_plans_failed", "remote_plans_replaced")


class FakeWorker:
    """One worker's policy over a synthetic batch; `run` steps it until `stop` is set."""

    def __init__(self, wid: str, queue, args, one_step: bool) -> None:
        self.wid, self.queue, self.args = wid, queue, args
        self.rng = np.random.default_rng(args.seed + int(wid[1:]))
        self.spec = PolicySpec.of("orbitflow", L, {"slo_s": 0.05, "windows": args.windows})
        self.policy = make_policy("orbitflow", L, cost_model=OnlineCostModel(COST), slo_s=0.05,
                                  windows=args.windows)
        if one_step:  # the baseline: ask one step before the window ends, whatever the round trip
            self.policy.ahead.lead_steps = lambda step_s, most: 1
        planning_of(self.policy).attach_remote(self.remote)
        self.views = [self._arrival(i) for i in range(args.requests)]
        demand = sum(v.num_tokens + 64 for v in self.views) * L
        self.device_blocks = int(args.device_frac * demand / BLOCK)
        self.round_trips: list[float] = []
        self.reports = self.steps = 0
        self._n = args.requests

    def _arrival(self, i: int) -> RequestView:
        n = int(np.exp(self.rng.uniform(np.log(4096), np.log(32768))))
        step = L * (A + B * 16384 * self.args.requests)
        slo = step * float(self.rng.choice([1.0, 1.5, 2.5]))
        return RequestView(f"{self.wid}-r{i}", n, n, n + 4096, time.time(), (Tier.DEVICE,) * L, 0, slo)

    def capacity(self) -> CapacityView:
        used = sum(-(-v.num_tokens // BLOCK) * sum(t == Tier.DEVICE for t in v.placement) for v in self.views)
        return CapacityView(L, BLOCK, BLOCK * KVB, self.device_blocks, max(0, self.device_blocks - used),
                            10 ** 9, 10 ** 9)

    def remote(self, key, views, cap, pinned, budget_s):
        req = SolveRequest(self.wid, key, tuple(views), cap, frozenset(pinned), COST, self.spec, budget_s)
        sent = time.perf_counter()
        fut = self.queue.solve(req)
        fut.add_done_callback(lambda f: self.round_trips.append(time.perf_counter() - sent))
        return fut

    def telemetry(self) -> WorkerTelemetry:
        return WorkerTelemetry(self.wid, time.time(), self.spec, tuple(self.views), 0, 0, self.capacity(),
                               COST, 131072)

    def run(self, stop: threading.Event) -> None:
        last_report, step_s = 0.0, 0.03
        while not stop.is_set():
            t0 = time.perf_counter()
            self.steps += 1
            ids = tuple(v.request_id for v in self.views)
            self.policy.observe(StepStats(0, step_s, ids, sum(v.num_tokens for v in self.views), len(ids), len(ids)))
            change = self.policy.replan(self.views, self.capacity())
            self._apply(change)
            self.views = [replace(v, num_tokens=v.num_tokens + 1, num_output_tokens=v.num_output_tokens + 1)
                          for v in self.views]
            step_s = self.policy.plan.predicted_step_s if self.policy.plan else 0.03
            if self.rng.random() < step_s / self.args.churn_s:  # one finishes, one arrives
                self.views[int(self.rng.integers(len(self.views)))] = self._arrival(self._n)
                self._n += 1
            if t0 - last_report >= self.args.report_s:
                last_report = t0
                self.queue.report(self.telemetry())
                self.reports += 1
            time.sleep(max(0.0, step_s - (time.perf_counter() - t0)))

    def _apply(self, change) -> None:
        if change is None:
            return
        paused = set(change.pause)
        self.views = [replace(v, placement=tuple(change.placements.get(v.request_id, v.placement)))
                      for v in self.views if v.request_id not in paused]
        while len(self.views) < self.args.requests:  # a paused request leaves; a new one takes its slot
            self.views.append(self._arrival(self._n))
            self._n += 1


class PlannerProcess:
    """`CentralPlanner` behind a `PlanQueue` in a child process (as on a cluster: the workers'
    threads and the ILP do not share a GIL); `report` and `solve` return Futures like the queue's."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")  # before any thread starts
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_planner_main, args=(child,), daemon=True)
        self.proc.start()
        self._futures: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _call(self, kind: str, msg) -> Future:
        fut: Future = Future()
        with self._lock:
            i = next(self._ids)
            self._futures[i] = fut
            self.conn.send((i, kind, msg))
        return fut

    def report(self, t: WorkerTelemetry) -> Future:
        return self._call("report", t)

    def solve(self, req: SolveRequest) -> Future:
        return self._call("solve", req)

    def warm(self, req: SolveRequest) -> Future:
        return self._call("warm", req)

    def finish(self) -> dict:
        return self._call("finish", None).result(timeout=120)

    def _read(self) -> None:
        while True:
            try:
                i, ok, answer = self.conn.recv()
            except EOFError:
                return
            fut = self._futures.pop(i)
            fut.set_result(answer) if ok else fut.set_exception(answer)


def _planner_main(conn) -> None:
    planner = CentralPlanner()
    queue = PlanQueue(planner)
    lock = threading.Lock()

    def answer(i: int, fut: Future) -> None:
        with lock:
            conn.send((i, fut.exception() is None, fut.exception() or fut.result()))

    while True:
        i, kind, msg = conn.recv()
        if kind == "warm":  # compile this worker's cvxpy shape, then forget the solve
            planner.solve(msg)
            planner._solve_s.clear()
            planner.stats.update(solves=0, solve_s_total=0.0, solve_s_max=0.0)
            planner.plans_by_solver.clear()
            with lock:
                conn.send((i, True, None))
            if queue._thread is None:
                queue.start()
        elif kind == "finish":
            queue.close()
            with lock:
                conn.send((i, True, {"stats": dict(planner.stats), "summary": planner.solve_summary()}))
            return
        else:
            fut = queue.report(msg) if kind == "report" else queue.solve(msg)
            fut.add_done_callback(lambda f, i=i: answer(i, f))


def run_mode(args, one_step: bool) -> dict:
    planner = PlannerProcess()
    workers = [FakeWorker(f"w{i}", planner, args, one_step) for i in range(args.workers)]
    t = time.perf_counter()
    for w in workers:  # compile each worker's cvxpy shape before the clock starts
        planner.warm(SolveRequest(w.wid, "warm-up", tuple(w.views), w.capacity(), frozenset(), COST,
                                  w.spec)).result(timeout=300)
    warm_s = time.perf_counter() - t
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in workers]
    for th in threads:
        th.start()
    time.sleep(args.seconds)
    stop.set()
    for th in threads:
        th.join()
    central = planner.finish()
    stats, solve = central["stats"], central["summary"]
    asked = sum(w.policy.ahead.stats["solves_remote"] for w in workers)
    outcome = {k: sum(w.policy.ahead.stats[k] for w in workers) for k in OUTCOMES}
    settled = sum(outcome.values())  # asked and settled: shares leave out those still pending
    needed = settled - outcome["remote_plans_replaced"]
    rt = [x for w in workers for x in w.round_trips]
    steps = sum(w.steps for w in workers)
    pct = (lambda xs, q: round(1e3 * float(np.percentile(xs, q)), 1) if len(xs) else None)
    ms = (lambda x: None if x is None else round(1e3 * x, 1))
    return {
        "mode": "one-step" if one_step else "ahead", "warm_up_s": round(warm_s, 1),
        "worker_steps": steps, "step_ms_mean": round(1e3 * args.workers * args.seconds / max(steps, 1), 1),
        "central_solves": stats["solves"], "plans_by_solver": solve["plans_by_solver"],
        "central_solve_ms_p50": ms(solve["solve_s_p50"]), "central_solve_ms_p99": ms(solve["solve_s_p99"]),
        "round_trip_ms_p50": pct(rt, 50), "round_trip_ms_p99": pct(rt, 99),
        "central_plans_asked": asked,
        **{f"share_{k.removeprefix('remote_plans_')}": round(v / settled, 3) if settled else None
           for k, v in outcome.items()},
        **outcome, "pending_at_end": asked - settled,
        # of the asks still wanted at the step that needed them (not replaced): used in time
        "share_used_when_needed": round(outcome["remote_plans_used"] / needed, 3) if needed else None,
        "lead_steps_mean": round(float(np.mean([w.policy.ahead.stats["remote_lead_steps"] for w in workers])), 1),
        "reports_sent": sum(w.reports for w in workers), "reports_solved": stats["reports"],
        "reports_coalesced": stats["reports_coalesced"], "probes_reused": stats["probes_reused"],
        "solves_superseded": stats["solves_superseded"], "solves_expired": stats["solves_expired"],
        "ilp_out_of_time": solve.get("solver_out_of_time", 0),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16, help="running requests per worker")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time per mode")
    ap.add_argument("--report-s", type=float, default=0.5, help="telemetry period (serving's default)")
    ap.add_argument("--churn-s", type=float, default=4.0, help="mean seconds between a finish+arrival")
    ap.add_argument("--device-frac", type=float, default=0.9,
                    help="device KV as a share of the batch's (lower: more offload, longer steps)")
    ap.add_argument("--windows", default="32,64,128", help="plan windows in decode steps (serving's default)")
    ap.add_argument("--modes", default="ahead,one-step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    args.windows = tuple(int(w) for w in args.windows.split(","))
    if not 0 < args.device_frac <= 1:
        ap.error("--device-frac must be in (0, 1]")
    if args.workers < 1 or args.requests < 1 or args.seconds <= 0 or args.report_s <= 0 or args.churn_s <= 0:
        ap.error("--workers, --requests, --seconds, --report-s and --churn-s must be positive")
    results = [run_mode(args, mode == "one-step") for mode in args.modes.split(",")]
    for r in results:
        print(json.dumps(r))
    by = {r["mode"]: r for r in results}
    if {"ahead", "one-step"} <= by.keys():
        for key, what in (("share_used_when_needed", "of those needed at their step"),
                          ("share_used", "of all asked (incl. replaced when the batch changed)")):
            a, b = by["ahead"][key] or 0.0, by["one-step"][key] or 0.0
            print(f"central plans used in time, {what}: ahead {a:.1%} vs one-step {b:.1%}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
