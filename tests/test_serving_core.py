"""The Ray-free serving core: routing, the central planner, the remote-plan hand-over, the engine on
its thread, the worker core, the OpenAI API in-process (real `openai` client over ASGI) and the
app's arguments. Random-weight `tiny-llama` wherever text is not needed; SmolLM2 (slow) once.

Run: .venv/bin/python -m pytest -q tests/test_serving_core.py   (-m 'not slow' skips SmolLM2)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import time
from dataclasses import replace
from types import SimpleNamespace

import httpx2
import openai
import pytest
from pydantic import ValidationError

from orbitflow_ray.config import EngineConfig
from orbitflow_ray.costmodel.linear import default_prior
from orbitflow_ray.engine import LLMEngine
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.llm import LLM, chat_token_ids
from orbitflow_ray.planner.ahead import AheadSolver, RemotePlan
from orbitflow_ray.planner.base import CapacityView, RequestView
from orbitflow_ray.sampling_params import SamplingParams
from orbitflow_ray.serving import central
from orbitflow_ray.serving import protocol as p
from orbitflow_ray.serving.api import build_api
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.serving.central import CentralPlanner, InProcessPlanner
from orbitflow_ray.serving.engine_loop import AsyncEngine, EngineDeadError, _Detokenizer
from orbitflow_ray.serving.messages import (GenerateRequest, PolicySpec, RoutingAdvice, SolveRequest,
                                            WorkerTelemetry)
from orbitflow_ray.serving.openai_service import OpenAIService
from orbitflow_ray.serving.routing import predicted_damage, rank_workers
from orbitflow_ray.serving.worker_core import WorkerCore

TINY = "tiny-llama"  # 4 layers, vocab 512, 2048 positions, no tokenizer: token-id prompts only
# Small KV tiers: the defaults (512 MiB + 1 GiB) cost seconds of page faults per engine on a busy host.
TINY_KV = dict(device_kv_bytes=4 << 20, host_kv_bytes=4 << 20)  # 4096 tokens of tiny-llama on device
SMOL = "smollm2-135m"
SMOL_KV = dict(kv_policy="no-offload", device_kv_bytes=64 << 20, host_kv_bytes=16 << 20)  # ~1400 tokens
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Say hi"}]
N = 6  # SmolLM2 tokens per request: a step is slow on 2 shared cores


def _req(rid: str, ids: list[int], params: SamplingParams, paced: bool = False) -> GenerateRequest:
    return GenerateRequest(rid, list(ids), params, paced=paced)


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


async def _drain(stream) -> list:
    return [d async for d in stream]


async def _on_engine(ae: AsyncEngine, fn):
    return await asyncio.wrap_future(ae.call(fn))


def _idle_state(e: LLMEngine) -> tuple[bool, int, int, int]:
    kv = e.kv_stats()
    return e.has_unfinished_requests(), kv["device_kv_bytes_used"], kv["host_kv_bytes_used"], e.num_steps


async def _settle(ae: AsyncEngine, max_more_steps: int = 30, timeout_s: float = 5.0) -> tuple:
    """Poll until the engine is idle, or has run `max_more_steps` more steps (a request it should
    have dropped is still running), or the timeout passes."""
    state = await _on_engine(ae, _idle_state)
    start_steps, deadline = state[3], time.monotonic() + timeout_s
    while state[0] and state[3] - start_steps < max_more_steps and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        state = await _on_engine(ae, _idle_state)
    return state


def _run_on_tiny(body, **cfg):
    """asyncio.run(body(engine)) on a fresh tiny engine, shut down before the loop closes (a request
    still running would otherwise deliver into a closed loop)."""
    async def main():
        ae = AsyncEngine(LLMEngine(EngineConfig(model=TINY, **{**TINY_KV, **cfg}))).start()
        try:
            return await body(ae)
        finally:
            ae.shutdown(timeout_s=5.0)

    return asyncio.run(main())


# ---- routing ------------------------------------------------------------------------------------

ADVICE = {"probe_tokens": [256, 1024, 4096], "damage": [0.0, 1.0, math.inf]}


def test_predicted_damage_picks_smallest_probe_at_least_as_long():
    assert predicted_damage(ADVICE, 1) == 0.0
    assert predicted_damage(ADVICE, 256) == 0.0
    assert predicted_damage(ADVICE, 257) == 1.0
    assert predicted_damage(ADVICE, 4096) == math.inf
    assert predicted_damage(ADVICE, 10 ** 6) == math.inf  # longer than every probe: the last one
    assert predicted_damage({}, 10) is None
    assert predicted_damage({"probe_tokens": [1, 2], "damage": [0.0]}, 1) is None  # malformed: no advice
    advice = RoutingAdvice(1, (256, 1024, 4096), (0.0, 1.0, math.inf), 0.0)
    assert [advice.damage_at(n) for n in (1, 256, 257, 4096, 10 ** 6)] == [0.0, 0.0, 1.0, math.inf, math.inf]


def test_rank_workers_orders_by_damage_then_knowledge_then_load():
    def w(damage, load=0):
        return {"probe_tokens": [100, 1000], "damage": damage, "running": load, "waiting": 0}

    candidates = {
        "inf": w([math.inf, math.inf]),
        "two": w([2.0, 2.0]),
        "one": w([1.0, math.inf]),
        "zero_busy": w([0.0, 0.0], load=5),
        "zero": w([0.0, 0.0]),
        "zero_too": w([0.0, 5.0]),
        "fresh": {"running": 0, "waiting": 0},  # no advice yet
    }
    ranks = rank_workers(candidates, 50)
    assert ranks == [["zero", "zero_too"], ["zero_busy"], ["fresh"], ["one"], ["two"], ["inf"]]
    # A prompt longer than every probe is judged by the last probe.
    ranks = rank_workers(candidates, 5000)
    assert ranks[0] == ["zero"] and ranks[-1] == ["inf", "one"]
    assert ranks.index(["fresh"]) < ranks.index(["two"]) < ranks.index(["zero_too"])
    # Unknown prompt length: by load only, everyone advised or not.
    by_load = rank_workers({"a": w([math.inf, math.inf], 3), "b": w([0.0, 0.0], 1), "c": {"waiting": 1}}, None)
    assert by_load == [["b", "c"], ["a"]]
    assert rank_workers({}, 10) == []


# ---- the central planner ------------------------------------------------------------------------

def _worker(worker_id: str, **cfg) -> WorkerCore:
    return WorkerCore(EngineConfig(model=TINY, kv_policy="orbitflow", **{**TINY_KV, **cfg}), worker_id)


@pytest.fixture(scope="module")
def workers():
    """An empty tiny worker and a nearly full one (40 device blocks, all taken; one request waits)."""
    empty = _worker("empty")
    full = _worker("full", device_kv_bytes=4096 * 40, host_kv_bytes=4096 * 400)
    for _ in range(3):
        full.engine.add_request([5] * 150, _greedy(10))
    full.engine.step()
    yield SimpleNamespace(empty=empty, full=full)
    empty.engine.close()
    full.engine.close()


def test_planner_report_gives_one_damage_per_probe(workers):
    planner = CentralPlanner(probe_tokens=(16, 256, 1024, 2048, 4096))
    t = workers.empty.telemetry()
    assert t.max_model_len == 2048 and not t.running
    advice = planner.report(t)
    assert advice.probe_tokens == (16, 256, 1024, 2048, 4096) and len(advice.damage) == 5
    assert advice.damage[3:] == (math.inf, math.inf)  # probes >= max_model_len can never run
    assert advice.damage_at(16) == 0.0  # a small request on an empty worker costs nothing

    t = workers.full.telemetry()
    assert t.capacity.device_free_blocks == 0 and len(t.running) == 2 and t.num_waiting == 1
    damage = planner.report(t).damage
    assert damage[:2] == (math.inf, math.inf)  # these fit the device at d = 1: they wait for room
    assert damage[2] == 0.0  # 1,024 tokens overflow it even at d = 1: all-host, needing no room there
    assert planner.stats["reports"] == 2 and planner.stats["probes"] == 10


def _hand_telemetry(worker_id: str, sent_at: float, device_free_blocks: int = 64) -> WorkerTelemetry:
    """A no-offload worker's report, built from planner views alone."""
    cap = CapacityView(4, 16, 4096, 64, device_free_blocks, 0, 0)
    running = () if device_free_blocks == 64 else (
        RequestView("r0", 200, 200, 64, 0.0, (Tier.DEVICE,) * 4, 0, 0.25, 0, None, 199),)
    return WorkerTelemetry(worker_id, sent_at, PolicySpec.of("no-offload", 4, {"slo_s": 0.25}), running, 0, 0,
                           cap, default_prior(4, None, "cpu"), 2048, {"device_kv_bytes_used": 1})


def test_planner_damage_from_hand_built_views():
    planner = CentralPlanner(probe_tokens=(16, 256, 4096))
    empty = planner.report(_hand_telemetry("a", time.time()))
    assert empty.damage == (0.0, 0.0, math.inf)  # 256 tokens x 4 layers = 64 blocks: just fits
    nearly_full = planner.report(_hand_telemetry("b", time.time(), device_free_blocks=10))
    assert nearly_full.damage == (0.0, math.inf, math.inf)  # 16 tokens fit 4 blocks; 256 do not
    assert nearly_full.version > empty.version


def test_policy_spec_is_order_independent():
    a = PolicySpec.of("orbitflow", 4, {"b": 1, "a": (2, 3)})
    b = PolicySpec.of("orbitflow", 4, {"a": (2, 3), "b": 1})
    assert a == b and hash(a) == hash(b) and a.options == (("a", (2, 3)), ("b", 1))


def test_planner_solve_returns_versioned_plans_and_state_lists_workers(workers):
    planner = CentralPlanner()
    t = workers.full.telemetry()
    advice = planner.report(t)
    key = ("predicted", 1)
    req = SolveRequest("full", key, t.running, t.capacity, frozenset(), t.cost_model, t.policy)
    first, second = planner.solve(req), planner.solve(req)
    assert isinstance(first, RemotePlan) and first.key == key and second.key == key
    assert advice.version < first.version < second.version
    plan, paused = first.result
    assert set(plan.distances) | set(paused) == {v.request_id for v in t.running}
    assert planner.stats["solves"] == 2 and planner.stats["solve_errors"] == 0

    no_plan = replace(req, policy=PolicySpec.of("no-offload", 4, {}))
    with pytest.raises(ValueError, match="does not plan"):
        planner.solve(no_plan)

    state = planner.state()
    w = state["workers"]["full"]
    assert list(state["workers"]) == ["full"]
    assert (w["policy"], w["running"], w["waiting"]) == ("orbitflow", 2, 1)
    assert w["context_tokens"] == sum(v.num_tokens for v in t.running)
    assert w["device_kv_bytes_used"] == t.kv["device_kv_bytes_used"] > 0
    text = json.dumps(state)  # JSON-friendly, and no request content leaves the planner
    assert "prompt" not in text and "req-" not in text


def test_planner_forgets_workers_that_stopped_reporting(monkeypatch):
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(central, "time", SimpleNamespace(time=lambda: clock.now, perf_counter=time.perf_counter))
    planner = CentralPlanner(probe_tokens=(16,), stale_after_s=5.0)
    planner.report(_hand_telemetry("old", clock.now))
    planner.report(_hand_telemetry("new", clock.now))
    assert set(planner.state()["workers"]) == {"old", "new"}
    clock.now += 4.0
    planner.report(_hand_telemetry("new", clock.now))
    assert set(planner.state()["workers"]) == {"old", "new"}  # 4 s old: not stale yet
    clock.now += 2.0
    planner.report(_hand_telemetry("new", clock.now))
    assert set(planner.state()["workers"]) == {"new"} and "old" not in planner._policies


# ---- the remote-plan hand-over ------------------------------------------------------------------

def _remote_solver(outcome) -> tuple[AheadSolver, list]:
    """An AheadSolver whose speculative solves go to a 'remote' that answers with `outcome`."""
    calls: list = []
    solver = AheadSolver(lambda *a: ("local", a), background=False)

    def remote(key, *args, budget_s=None):
        calls.append((key, args))
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        elif outcome is not None:
            fut.set_result(outcome)
        return fut

    solver.remote = remote
    return solver, calls


def test_remote_plan_used_only_for_its_key():
    solver, calls = _remote_solver(RemotePlan(7, "k1", "plan-for-k1"))
    solver.submit("k1", "views", "cap")
    assert calls == [("k1", ("views", "cap"))] and solver.stats["solves_remote"] == 1
    assert solver.pending("k1") and solver.take("other") is None and solver.pending("k1")
    assert solver.take("k1") == "plan-for-k1"
    assert solver.stats["remote_plans_used"] == 1 and solver.stats["plan_version"] == 7
    assert solver.take("k1") is None  # taken once


def test_remote_plan_for_another_batch_is_ignored():
    solver, _ = _remote_solver(RemotePlan(9, "stale-key", "wrong"))
    solver.submit("k1")
    assert solver.take("k1") is None
    assert solver.stats["remote_plans_used"] == 0 and solver.stats["plan_version"] == 0


def test_failed_or_late_remote_plan_is_not_used():
    solver, _ = _remote_solver(ConnectionError("planner down"))
    solver.submit("k1")
    assert solver.take("k1") is None and solver.stats["remote_plans_used"] == 0
    late, _ = _remote_solver(None)  # never answers: take must not block
    late.submit("k1")
    t0 = time.perf_counter()
    assert late.take("k1") is None and time.perf_counter() - t0 < 0.1
    assert late.pending("k1")
    assert late.solve_now("x") == ("local", ("x",)) and late.stats["solves_sync"] == 1


# ---- AsyncEngine on tiny-llama --------------------------------------------------------------------

def test_refused_request_raises_and_others_go_on():
    async def run(ae):
        good = ae.stream(_req("good", [5] * 8, _greedy(50)))  # still running for the duplicate id
        first = await anext(good)  # accepted
        assert (first.text, first.token_ids, first.finished, first.prompt_tokens) == ("", [], False, 8)
        rest = asyncio.create_task(_drain(good))
        for rid, ids, why in (("long", [5] * 64, "context window"), ("vocab", [5, 512], "out of range"),
                              ("good", [5, 6], "already in use")):
            with pytest.raises(ValueError, match=why):
                await anext(ae.stream(_req(rid, ids, _greedy(4))))
        deltas = await rest
        assert deltas[-1].finished and deltas[-1].completion_tokens == 50
        assert sum(len(d.token_ids) for d in deltas) == 50
        assert not (await _settle(ae))[0]

    _run_on_tiny(run, max_model_len=64)


def test_a_refusal_from_a_worker_replica_reaches_the_client_as_its_own_message():
    """Over Serve the worker's ValueError comes back wrapped in Ray's RayTaskError, whose text starts
    with the replica's name and pid; the 400 must carry the engine's own words."""
    from ray.exceptions import RayTaskError

    why = "the prompt needs 90 KV blocks; this worker's device tier holds 64"
    try:
        raise ValueError(why)
    except ValueError as cause:
        wrapped = RayTaskError("handle_request_with_rejection", f"  File \"worker.py\", line 1\nValueError: {why}", cause,
                               proctitle="ray::ServeReplica:orbitflow:OrbitFlowWorker", pid=1, ip="127.0.0.1",
                               actor_id="ab").as_instanceof_cause()
    assert isinstance(wrapped, ValueError) and not str(wrapped).startswith(why)

    async def refused():
        raise wrapped
        yield  # an async generator, as the worker's stream is

    with pytest.raises(p.BadRequestError) as err:
        asyncio.run(OpenAIService._accepted(None, refused(), None))
    assert str(err.value) == why and err.value.status_code == 400


def test_stream_token_ids_match_offline_generate():
    prompt, params = [5, 6, 7, 8] * 3, _greedy(12)
    offline = LLM(TINY, **TINY_KV).generate([prompt], params)[0]

    async def run(ae):
        return await _drain(ae.stream(_req("r", prompt, params, paced=True)))

    deltas = _run_on_tiny(run)
    assert [t for d in deltas for t in d.token_ids] == offline.token_ids
    assert deltas[-1].finish_reason == offline.finish_reason == "length"
    assert [d.finished for d in deltas].count(True) == 1


def test_the_engine_counts_ttft_from_the_ingress_arrival():
    """A request that waited 30 s before its worker took it (in Serve's queue) reaches the engine
    with 30 s of its TTFT SLO spent: the scheduler's slack (`RequestView.ttft_slack_s`) and the
    TTFT it reports both count that time."""
    params = _greedy(2, ttft_slo_s=40.0)

    async def run(ae):
        req = GenerateRequest("late", [5, 6, 7], params, arrival_unix=time.time() - 30.0)
        outs = [out async for out in ae.generate(req)]
        fresh = [out async for out in ae.generate(GenerateRequest("fresh", [5, 6, 7], params))]
        return outs[-1], fresh[-1]

    late, fresh = _run_on_tiny(run)
    assert late.finished and len(late.token_ids) == 2
    assert 30.0 <= late.metrics.ttft < 35.0  # queued 30 s, then a few ms of prefill
    assert fresh.metrics.ttft < 5.0  # no ingress time: it arrives when the worker takes it


def test_a_failing_on_finish_hook_costs_the_client_nothing():
    prompt, params = [5, 6, 7, 8], _greedy(3)

    def broken(out):
        raise AttributeError("a metrics hook's bug")

    async def run(ae):
        return await _drain(ae.stream(_req("r", prompt, params), on_finish=broken))

    deltas = _run_on_tiny(run)
    assert sum(len(d.token_ids) for d in deltas) == 3 and deltas[-1].finished


def test_closing_a_stream_aborts_the_request_and_frees_its_kv():
    async def run(ae):
        stream = ae.stream(_req("r", [5, 6, 7, 8] * 10, _greedy(1500)))
        await anext(stream)  # accepted
        d = await anext(stream)  # first token
        assert d.token_ids
        busy = await _on_engine(ae, _idle_state)
        assert busy[0] and busy[1] > 0
        await stream.aclose()
        return await _settle(ae)

    unfinished, device, host, _ = _run_on_tiny(run)
    assert (unfinished, device, host) == (False, 0, 0)


def test_a_client_gone_before_the_engine_takes_its_request_costs_nothing_else():
    """The client's wait for acceptance is cancelled while the engine thread is busy; when the
    engine reaches the request it drops it (before: setting the cancelled future's result raised
    InvalidStateError on the engine thread, which died, and every later request got a 503)."""
    async def run(ae):
        busy = ae.call(lambda e: time.sleep(0.5))  # holds the engine thread
        left = asyncio.create_task(anext(ae.stream(_req("gone", [5] * 8, _greedy(4)))))
        await asyncio.sleep(0.1)
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left
        await asyncio.wrap_future(busy)
        deltas = await _drain(ae.stream(_req("next", [5] * 8, _greedy(4))))
        assert sum(len(d.token_ids) for d in deltas) == 4 and deltas[-1].finished
        ae.check_health()
        return await _settle(ae)

    unfinished, device, host, _ = _run_on_tiny(run)
    assert (unfinished, device, host) == (False, 0, 0)


def test_closing_a_stream_right_after_acceptance_aborts_the_request():
    async def run(ae):
        stream = ae.stream(_req("r", [5, 6, 7, 8] * 10, _greedy(1500)))
        await anext(stream)  # accepted, no token yet
        await stream.aclose()
        return await _settle(ae, max_more_steps=30)

    unfinished, device, host, _ = _run_on_tiny(run)
    assert (unfinished, device, host) == (False, 0, 0)


def _dying_engine(monkeypatch, after_steps: int) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=TINY, **TINY_KV))
    real, count = engine.step, [0]

    def step():
        count[0] += 1
        if count[0] > after_steps:
            raise RuntimeError("device lost")
        return real()

    monkeypatch.setattr(engine, "step", step)
    return engine


def test_engine_death_fails_open_streams_and_health(monkeypatch):
    ae = AsyncEngine(_dying_engine(monkeypatch, after_steps=3)).start()

    async def run():
        got = []
        with pytest.raises(EngineDeadError, match="device lost"):
            async for d in ae.stream(_req("r", [5, 6, 7, 8], _greedy(50))):
                got.append(d)
        assert got and sum(len(d.token_ids) for d in got) == 3
        with pytest.raises(EngineDeadError):
            await anext(ae.stream(_req("after", [5], _greedy(2))))

    try:
        asyncio.run(run())
        ae._thread.join(5.0)
        assert not ae.alive and isinstance(ae.error, RuntimeError)
        with pytest.raises(EngineDeadError, match="device lost"):
            ae.check_health()
    finally:
        ae.shutdown(timeout_s=1.0)


def test_call_after_engine_death_fails_instead_of_hanging(monkeypatch):
    ae = AsyncEngine(_dying_engine(monkeypatch, after_steps=0)).start()

    async def kill():
        with pytest.raises(EngineDeadError):
            await _drain(ae.stream(_req("r", [5], _greedy(4))))

    try:
        asyncio.run(kill())
        ae._thread.join(5.0)
        with pytest.raises(EngineDeadError):
            ae.call(lambda e: e.num_steps).result(timeout=0.5)
    finally:
        ae.shutdown(timeout_s=1.0)


# ---- the detokenizer ----------------------------------------------------------------------------

def test_detokenizer_without_stops_passes_text_through():
    d = _Detokenizer([])
    assert [d.delta(t, False) for t in ("He", "Hello", "Hello wor")] == ["He", "llo", " wor"]
    assert d.delta("Hello world", True) == "ld"
    assert d.delta("Hello world", True) == ""


def test_detokenizer_holds_partial_characters():
    d = _Detokenizer([])
    assert d.delta("caf\ufffd", False) == "caf"
    assert d.delta("caf\ufffd\ufffd", False) == ""
    assert d.delta("café", False) == "é"
    assert d.delta("café \ufffd", True) == " \ufffd"  # finished: nothing more will complete it


def test_detokenizer_holds_a_forming_stop_string():
    d = _Detokenizer(["\n\n", "STOP"])  # holds len("STOP") - 1 = 3 characters
    assert d.delta("ab", False) == ""
    assert d.delta("Paris", False) == "Pa"
    assert d.delta("Paris.\n", False) == "ri"
    # The engine found "\n\n" and cut the text before it: nothing of the stop was ever sent.
    assert d.delta("Paris.", True) == "s."
    d = _Detokenizer(["END"])
    parts = [d.delta(t, False) for t in ("one two", "one two thr", "one two three E")]
    parts.append(d.delta("one two three ", True))
    assert "".join(parts) == "one two three " and "E" not in "".join(parts)


def test_detokenizer_never_takes_back_sent_text():
    d = _Detokenizer([])
    assert d.delta("abcdef", False) == "abcdef"
    assert d.delta("abc", True) == ""  # shorter final text: nothing resent, nothing retracted
    assert d.delta("abcdefgh", True) == "gh"


# ---- WorkerCore with the central planner --------------------------------------------------------

async def _generate_on_worker(planner, **core_kw) -> tuple[WorkerCore, list, dict]:
    cfg = EngineConfig(model=TINY, kv_policy="orbitflow", plan_windows=(4,), **TINY_KV)
    core = WorkerCore(cfg, "w0", planner, telemetry_period_s=0.02, **core_kw).start(asyncio.get_running_loop())
    try:
        deltas = await asyncio.wait_for(_drain(core.core.stream(_req("r", [5, 6, 7, 8] * 4, _greedy(30)))), 30)
        policy_stats = await _on_engine(core.core, lambda e: e.policy_stats())
    finally:
        core.core.shutdown(timeout_s=5.0)
    return core, deltas, policy_stats


def test_worker_reports_and_uses_remote_plans():
    # the fast path centrally: tiny-llama's steps are far shorter than a cvxpy solve, so ILP plans
    # would come back late here (tests/test_planner_central.py covers the cvxpy plans)
    planner = InProcessPlanner(CentralPlanner(solver="fast"))
    core, deltas, ps = asyncio.run(_generate_on_worker(planner))
    assert deltas[-1].finished and deltas[-1].completion_tokens == 30
    assert ps["solves_remote"] >= 1 and ps["remote_plans_used"] >= 1 and ps["plan_version"] > 0
    assert core.stats["reports_sent"] >= 1 and core.stats["reports_failed"] == 0
    stats = core.routing_stats()
    assert stats["worker_id"] == "w0" and stats["probe_tokens"] == list(central.PROBE_TOKENS)
    assert len(stats["damage"]) == len(stats["probe_tokens"]) and stats["damage"][0] == 0.0
    assert stats["advice_version"] >= 1 and stats["free_device_kv_bytes"] > 0
    assert "running" in stats and "waiting" in stats
    assert core.routing_stats(advice_ttl_s=0.0).keys().isdisjoint({"damage", "probe_tokens"})
    assert "w0" in planner.planner.state()["workers"] and planner.planner.stats["solves"] >= 1


class _BrokenPlanner:
    def __init__(self, hang: bool) -> None:
        self.hang = hang

    async def _fail(self, *_):
        if self.hang:
            await asyncio.Event().wait()
        raise ConnectionError("planner down")

    report = solve = _fail


@pytest.mark.parametrize("hang", [False, True], ids=["raises", "hangs"])
def test_worker_serves_when_the_planner_fails(hang):
    t0 = time.perf_counter()
    core, deltas, ps = asyncio.run(_generate_on_worker(_BrokenPlanner(hang), solve_timeout_s=0.1))
    assert deltas[-1].finished and deltas[-1].completion_tokens == 30
    assert core.stats["reports_sent"] == 0 and ps["solves_remote"] >= 1 and ps["remote_plans_used"] == 0
    assert time.perf_counter() - t0 < 20
    if not hang:
        assert core.stats["reports_failed"] > 0 and core.stats["remote_solves_failed"] > 0
    assert "damage" not in core.routing_stats()


def test_worker_core_rejects_bad_periods():
    with pytest.raises(ValueError, match="positive"):
        WorkerCore(EngineConfig(model=TINY, **TINY_KV), "w", None, telemetry_period_s=0)


# ---- SmolLM2: streams and the OpenAI API against the offline engine ------------------------------

@pytest.fixture(scope="module")
def smol():
    """SmolLM2 loaded once: offline greedy references first, then the same engine on its thread."""
    llm = LLM(SMOL, **SMOL_KV)
    chat_ids = chat_token_ids(llm.tokenizer, MESSAGES)
    plain, stopped, chat = llm.generate(
        [PROMPT, PROMPT, chat_ids],
        [SamplingParams(max_tokens=N), SamplingParams(max_tokens=N, stop=["\n\n"]), SamplingParams(max_tokens=N)])
    ae = AsyncEngine(llm.engine).start()
    yield SimpleNamespace(llm=llm, engine=ae, plain=plain, stopped=stopped, chat=chat, chat_ids=chat_ids)
    ae.shutdown()


@pytest.mark.slow
def test_stream_text_matches_offline_greedy(smol):
    # The references are what make this test meaningful: a stop that cuts the text mid-generation.
    assert "\n\n" in smol.plain.text and smol.stopped.finish_reason == "stop"

    async def run():
        ids = smol.plain.prompt_token_ids
        return await asyncio.gather(
            _drain(smol.engine.stream(_req("plain", ids, SamplingParams(max_tokens=N), paced=True))),
            _drain(smol.engine.stream(_req("stop", ids, SamplingParams(max_tokens=N, stop=["\n\n"]), paced=True))))

    plain, stopped = asyncio.run(run())
    for deltas, ref in ((plain, smol.plain), (stopped, smol.stopped)):
        assert deltas[0].text == "" and deltas[0].token_ids == [] and not deltas[0].finished
        assert "".join(d.text for d in deltas) == ref.text
        assert [t for d in deltas for t in d.token_ids] == ref.token_ids
        assert deltas[-1].finished and deltas[-1].finish_reason == ref.finish_reason
        assert deltas[-1].completion_tokens == len(ref.token_ids)
    assert all("\n" not in d.text for d in stopped)  # the forming stop was held back, never sent


def _clients(app) -> tuple[openai.AsyncOpenAI, httpx2.AsyncClient]:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app), base_url="http://t")
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http, max_retries=0), http


async def _completion_stream(client) -> tuple[str, object, list[str | None]]:
    stream = await client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=N, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    parts, usage, reasons = [], None, []
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].text)
            reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(parts), usage, reasons


async def _chat_stream(client) -> tuple[str, list[str | None]]:
    stream = await client.chat.completions.create(model=SMOL, messages=MESSAGES, max_tokens=N, temperature=0,
                                                  stream=True)
    parts, reasons = [], []
    async for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    return "".join(parts), reasons


def _error(e: openai.APIStatusError) -> dict:
    body = e.body if isinstance(e.body, dict) else {}
    return body.get("error", body)


@pytest.mark.slow
def test_openai_api_matches_offline_engine_and_rejects_bad_input(smol):
    service = OpenAIService(AppArgs(engine=SMOL_KV), smol.engine.stream)
    planner = CentralPlanner(probe_tokens=(16,))
    planner.report(_hand_telemetry("w0", time.time()))

    async def state():
        return planner.state()

    app = build_api(service, state)

    async def good(client):
        comp, chat, (comp_s, usage, comp_reasons), (chat_s, chat_reasons) = await asyncio.gather(
            client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=N, temperature=0),
            client.chat.completions.create(model=SMOL, messages=MESSAGES, max_tokens=N, temperature=0),
            _completion_stream(client), _chat_stream(client))
        assert comp.choices[0].text == comp_s == smol.plain.text
        assert chat.choices[0].message.content == chat_s == smol.chat.text
        assert comp.choices[0].finish_reason == chat.choices[0].finish_reason == "length"
        assert comp_reasons == chat_reasons == ["length"]
        assert (comp.usage.prompt_tokens, comp.usage.completion_tokens) == (len(smol.plain.prompt_token_ids), N)
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(smol.chat_ids), N)
        assert (usage.prompt_tokens, usage.completion_tokens) == (comp.usage.prompt_tokens, N)
        assert chat.choices[0].message.role == "assistant" and comp.model == SMOL

    async def bad(client, http):
        for call, kw, err, field in [
            (client.completions.create, dict(model="nope", prompt="x"), openai.NotFoundError, "model"),
            (client.chat.completions.create, dict(model="nope", messages=MESSAGES), openai.NotFoundError, "model"),
            (client.completions.create, dict(model=SMOL, prompt="x", max_tokens=0), openai.BadRequestError,
             "max_tokens"),
            (client.completions.create, dict(model=SMOL, prompt="x", max_tokens=100000), openai.BadRequestError,
             "max_tokens"),
            (client.completions.create, dict(model=SMOL, prompt=[5, 49152]), openai.BadRequestError, "prompt"),
            (client.completions.create, dict(model=SMOL, prompt=[5] * 8192, max_tokens=1), openai.BadRequestError,
             "prompt"),
            (client.completions.create, dict(model=SMOL, prompt="x", best_of=2), openai.BadRequestError, "best_of"),
            (client.chat.completions.create, dict(model=SMOL, messages=[]), openai.BadRequestError, "messages"),
        ]:
            with pytest.raises(err) as ei:
                await call(**kw)
            body = _error(ei.value)
            assert body["message"] and body["type"].endswith("_error") and body["param"] == field, (kw, body)
        with pytest.raises(openai.BadRequestError) as ei:
            await client.completions.create(model=SMOL, prompt="x", max_tokens=100000)
        assert _error(ei.value)["code"] == "context_length_exceeded"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")  # no such route
        raw = await http.post("/v1/completions", content=b"{not json",
                                        headers={"content-type": "application/json"})
        assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"

    async def run():
        client, http = _clients(app)
        await good(client)
        await bad(client, http)
        after = await client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=2, temperature=0)
        assert after.usage.completion_tokens == 2 and smol.plain.text.startswith(after.choices[0].text)
        assert [m.id for m in (await client.models.list()).data] == [SMOL]
        st = (await http.get("/v1/orbitflow/state")).json()
        assert list(st["workers"]) == ["w0"]
        return await _settle(smol.engine)

    unfinished, device, host, _ = asyncio.run(run())
    assert (unfinished, device, host) == (False, 0, 0)  # every request finished and freed its KV


# ---- AppArgs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field, words", [
    (dict(engine={"bogus_field": 1}), "", "bogus_field"),
    (dict(engine={"kv_policy": "no-such-policy"}), "", "no-such-policy"),
    (dict(engine={"model": "tiny-llama"}), "", "top level"),
    (dict(engine={"block_size": 0}), "", "block_size"),
    (dict(telemetry_period_s=0), "telemetry_period_s", "positive"),
    (dict(telemetry_period_s=-1.0), "telemetry_period_s", "positive"),
    (dict(default_ttft_slo_s=0.0), "default_ttft_slo_s", "positive"),
    (dict(default_ttft_slo_s=math.inf), "default_ttft_slo_s", "positive"),
    (dict(default_ttft_slo_s=math.nan), "default_ttft_slo_s", "positive"),
    (dict(torch_threads=0), "torch_threads", ">= 1"),
    (dict(no_such_arg=1), "no_such_arg", "Extra inputs"),
])
def test_app_args_rejects_bad_config_naming_the_field(kwargs, field, words):
    with pytest.raises(ValidationError) as ei:
        AppArgs(**kwargs)
    errors = ei.value.errors()
    assert len(errors) == 1
    assert ".".join(str(p) for p in errors[0]["loc"]) == field
    assert words in str(ei.value)


def test_app_args_defaults_and_engine_config():
    args = AppArgs()
    assert args.name == "smollm2-135m" and args.engine_config().kv_policy == "orbitflow"
    args = AppArgs(model=TINY, served_model_name="tiny", engine={"kv_policy": "orbitflow", "plan_windows": [8]},
                   telemetry_period_s=0.2)
    cfg = args.engine_config()
    assert args.name == "tiny" and cfg.model == TINY and cfg.plan_windows == (8,)
    assert AppArgs.model_validate(args.model_dump()) == args
