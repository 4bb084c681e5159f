"""KV content survives every move between tiers (issue 13).

Hypothesis drives the real scheduler, tier manager, KV store, model runner and CPU transfer engine
(with and without an emulated link) through random arrivals, aborts, placement changes and steps
under every policy, with budgets that force swaps, recomputes and pauses. The probe model
(`kv_probe.py`) writes K/V that name their (layer, position, token, head); every read attention
makes is checked, and after every step every live request's blocks in both tiers are read back and
compared, paused and swapped ones included, and the state machine's invariants are asserted.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_probe import ProbeEngine, probe_spec
from orbitflow_ray.config import EngineConfig
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner import available_policies
from orbitflow_ray.planner.base import PlacementPlan
from orbitflow_ray.request import RequestStatus
from orbitflow_ray.sched.states import check_invariants

SPEC = probe_spec(num_layers=4)
BLOCK_SIZE = 4
BLOCK_BYTES = SPEC.kv_bytes_per_token_per_layer(4) * BLOCK_SIZE
MAX_STEPS = 3000

op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 80)),
    st.tuples(st.just("add"), st.integers(20, 40), st.integers(40, 80)),
    st.tuples(st.just("abort"), st.integers(0, 1000)),
    st.tuples(st.just("place"), st.integers(0, 1000), st.lists(st.sampled_from(list(Tier)), min_size=4, max_size=4)),
    st.tuples(st.just("step"), st.integers(1, 6)),
)


def _engine(policy: str, device_blocks: int, host_blocks: int, bandwidth: float | None,
            backend: str = "cpu") -> ProbeEngine:
    cfg = EngineConfig(model="probe", kv_policy=policy, backend=backend, device_kv_bytes=device_blocks * BLOCK_BYTES,
                       host_kv_bytes=host_blocks * BLOCK_BYTES, block_size=BLOCK_SIZE,
                       max_num_batched_tokens=48, prefill_chunk_size=16, max_num_seqs=6,
                       link_bandwidth_bytes_per_s=bandwidth, solve_ahead=False, plan_windows=(4, 8),
                       tpot_slo_s=0.05)
    return ProbeEngine(cfg, SPEC)


def _checked_step(eng: ProbeEngine) -> None:
    eng.step()
    check_invariants(eng.scheduler)
    eng.check_resident()


def _run_program(eng: ProbeEngine, program) -> None:
    for item in program:
        kind = item[0]
        live = sorted(eng.scheduler.requests)
        if kind == "add":
            try:
                eng.add(item[1], item[2])
            except ValueError:
                pass  # larger than a tier can ever hold: rejected on arrival, nothing else changes
        elif kind == "abort" and live:
            eng.scheduler.abort(live[item[1] % len(live)])
        elif kind == "place":
            running = [r.request_id for r in eng.scheduler.running]
            if running:
                eng.scheduler.set_placement(running[item[1] % len(running)], item[2])
        elif kind == "step":
            for _ in range(item[1]):
                _checked_step(eng)
        check_invariants(eng.scheduler)
    steps = 0
    while eng.scheduler.has_unfinished():
        _checked_step(eng)
        steps += 1
        assert steps < MAX_STEPS, "no progress: a livelock or a request that never finishes"
    eng.check_outputs()
    assert eng.kv.used_bytes(Tier.DEVICE) == 0 and eng.kv.used_bytes(Tier.HOST) == 0


def _cuda() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda(), reason="needs cupy and a CUDA device"))]


@pytest.mark.parametrize("backend", BACKENDS)
# The package's policies: a test module's policy (test_gpu_check's, which cycles placements whatever
# the tiers hold) would make the parametrization depend on which modules were imported first.
@pytest.mark.parametrize("policy", available_policies(builtin_only=True))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(op, min_size=4, max_size=30), device_blocks=st.integers(16, 80),
       host_blocks=st.sampled_from([0, 40, 400]), bandwidth=st.sampled_from([None, 2e7]))
def test_kv_content_survives_any_sequence(backend, policy, program, device_blocks, host_blocks, bandwidth):
    eng = _engine(policy, device_blocks, host_blocks, bandwidth if backend == "cpu" else None, backend)
    try:
        _run_program(eng, program)
    finally:
        eng.close()


def test_probe_catches_a_corrupted_block():
    """The check is live: one wrong value in a host block is reported at the next read."""
    eng = _engine("all-offload", 40, 400, None)
    rid = eng.add(8, 8)
    _checked_step(eng)
    block = eng.kv.table(rid)[2].blocks[1]
    eng.store.pools[Tier.HOST][block, 0, 1, 3, 1] += 1.0  # position 7, K, head 1
    with pytest.raises(AssertionError, match="layer 2 on HOST"):
        eng.check_resident()
    with pytest.raises(AssertionError, match=f"{rid} layer 2"):
        eng.step()
    eng.close()


def test_round_trip_in_one_step_keeps_content():
    """The case that corrupted SmolLM2's output: a layer moved to device and back to host before
    one step runs (resume, then preemption or pause) keeps its host blocks and needs no copy."""
    eng = _engine("all-offload", 40, 400, None)
    a = eng.add(12, 20)
    for _ in range(3):
        _checked_step(eng)
    host_blocks = list(eng.kv.table(a)[1].blocks)
    assert eng.scheduler.set_placement(a, [Tier.HOST, Tier.DEVICE, Tier.HOST, Tier.HOST])
    assert eng.scheduler.set_placement(a, [Tier.HOST] * 4)
    assert eng.kv.table(a)[1].blocks == host_blocks
    assert eng.kv.take_moves() == []
    eng.scheduler.set_placement(a, [Tier.DEVICE] * 4)
    while eng.scheduler.has_unfinished():
        _checked_step(eng)
    eng.check_outputs()
    eng.close()


def test_resume_at_all_host_placement_does_not_crash():
    """Issue 13 item 3: a paused request that the policy's plan leaves out (its placement
    unchanged: every layer on host) resumes where it is instead of raising KeyError."""
    eng = _engine("no-offload", 60, 400, None)
    a, b = eng.add(10, 30), eng.add(10, 30)
    for _ in range(4):
        _checked_step(eng)
    eng.scheduler._pause(eng.scheduler.requests[a])
    check_invariants(eng.scheduler)
    eng.policy.admit = lambda req, running, cap: PlacementPlan({})  # "no change" for the resumed one
    _checked_step(eng)
    assert eng.scheduler.requests[a].status == RequestStatus.RUNNING
    assert eng.kv.placement(a) == [Tier.HOST] * 4
    while eng.scheduler.has_unfinished():
        _checked_step(eng)
    assert eng.scheduler.num_pauses == 1 and len(eng.outputs[a]) == len(eng.outputs[b]) == 30
    eng.check_outputs()
    eng.close()
