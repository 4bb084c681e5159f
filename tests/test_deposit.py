"""Token-Deposit: the release rule's invariants (planner/deposit.py), the bank target the plan
sets, and an idle stream under `orbitflow` released as produced (in the simulator)."""

import pytest
from hypothesis import given, settings, strategies as st

from orbitflow_ray.planner.deposit import ArrivalForecast, TokenDeposit, bank_target
from orbitflow_ray.sim.simulator import SimConfig, simulate
from orbitflow_ray.sim.workload import TraceRequest

EPS = 1e-9


def emitted(d: TokenDeposit, times) -> TokenDeposit:
    for t in times:
        d.emit(t)
    return d


# ---- without a target: the paper's rule, every token paced --------------------------------------
def test_deposit_banks_fast_tokens_and_covers_a_stall():
    d = emitted(TokenDeposit(slo_s=1.0, pace=1.0), (0.0, 0.1, 0.2, 0.3))  # the paper's pace
    assert d.release_times == [0.0, 1.0, 2.0, 3.0]
    assert d.banked(0.3) == 3
    d.emit(3.5)  # a 3.2 s stall: on time, the bank covered it
    assert d.num_late == 0 and d.release_times[-1] == 4.0
    d.emit(6.0)  # the bank is empty and the pace (5.0) is missed
    assert d.num_late == 1 and d.release_times[-1] == 6.0


def test_deposit_pace_leaves_slack_in_the_mean():
    d = emitted(TokenDeposit(slo_s=1.0, pace=0.9), (0.0, 0.1, 0.2, 2.75))  # banked twice, one slow step
    assert d.release_times == pytest.approx([0.0, 0.9, 1.8, 2.75])  # 2.75 <= 1.8 + 1.0: on time
    assert d.num_late == 0 and (d.release_times[-1] - d.release_times[0]) / 3 <= 1.0


def test_deposit_disabled_streams_as_produced():
    d = emitted(TokenDeposit(slo_s=1.0, enabled=False, target_tokens=3), (0.0, 0.5, 2.0, 2.1))
    assert d.release_times == [0.0, 0.5, 2.0, 2.1] and d.num_late == 1 and d.banked(2.1) == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="pace"):
        TokenDeposit(slo_s=1.0, pace=0.0)
    with pytest.raises(ValueError, match="target_tokens"):
        TokenDeposit(slo_s=1.0, target_tokens=-1)
    d = emitted(TokenDeposit(slo_s=1.0), (1.0,))
    with pytest.raises(ValueError, match="time order"):
        d.emit(0.5)
    with pytest.raises(ValueError, match="flush"):
        d.flush(0.5)
    d.target_tokens = -2
    with pytest.raises(ValueError, match="target_tokens"):
        d.emit(2.0)


# ---- with a target --------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 3.0), min_size=1, max_size=40), st.floats(0.1, 2.0), st.floats(0.5, 1.0))
def test_target_zero_releases_as_emitted(gaps, slo, pace):
    d, plain = TokenDeposit(slo_s=slo, pace=pace, target_tokens=0), TokenDeposit(slo_s=slo, enabled=False)
    t = 0.0
    for g in gaps:
        t += g
        assert d.emit(t) == t
        plain.emit(t)
    assert d.release_times == d.emit_times and d.num_late == plain.num_late and d.banked(t) == 0


def test_banks_exactly_up_to_the_target_then_streams_at_the_engine_rate():
    d = TokenDeposit(slo_s=1.0, pace=0.5, target_tokens=3)  # paced at 0.5 s while banking
    first = [d.emit(0.1 * i) for i in range(4)]  # the engine makes a token every 0.1 s
    assert first == pytest.approx([0.0, 0.5, 1.0, 1.5])  # banking: every gap is the pace
    banked = [d.banked(0.3)]
    for i in range(4, 10):
        d.emit(0.1 * i)
        banked.append(d.banked(0.1 * i))
    assert banked == [3] * 7  # after each emit: exactly the target
    rel = d.release_times
    assert rel[0] == 0.0
    assert rel[1:7] == pytest.approx(d.emit_times[4:])  # each leaves with the emit 3 tokens later
    assert rel[7:] == pytest.approx([1.4, 1.9, 2.4])  # the bank, paced behind the last release
    assert d.num_late == 0
    d.emit(3.3)  # a 2.4 s stall after the last emit: the bank (1.5 s) + the SLO (1 s) cover it
    assert d.num_late == 0 and d.banked(3.3) == 0


def test_full_bank_releases_at_the_engine_rate():
    d = TokenDeposit(slo_s=1.0, pace=0.1, target_tokens=2)  # pace 0.1 s: the bank fills by 0.2 s
    emitted(d, [0.5 * i for i in range(8)])  # the engine is slower than the pace: nothing banks
    assert d.release_times == d.emit_times
    d = TokenDeposit(slo_s=1.0, pace=0.1, target_tokens=2)
    emitted(d, [0.05 * i for i in range(8)])  # faster than the pace: two banked, the rest as produced
    rel = d.release_times
    assert rel[:3] == pytest.approx([0.0, 0.1, 0.2])
    assert rel[3:6] == pytest.approx([0.25, 0.3, 0.35])  # token i leaves with token i + 2's emit
    assert rel[6:] == pytest.approx([0.45, 0.55])  # the bank: paced behind the last release


def test_lowering_the_target_releases_the_excess_at_the_next_emit_and_flush_empties_it():
    d = emitted(TokenDeposit(slo_s=1.0, pace=1.0, target_tokens=4), (0.0, 0.1, 0.2, 0.3, 0.4))
    assert d.banked(0.4) == 4
    d.target_tokens = 1
    d.emit(0.5)
    assert d.banked(0.5) == 1 and d.release_times[1:5] == [0.5] * 4 and d.release_times[5] == 1.5
    d.flush(0.6)
    assert d.banked(0.6) == 0 and d.release_times[-1] == 0.6


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 3.0), st.one_of(st.none(), st.integers(0, 6))), min_size=1, max_size=40),
       st.floats(0.1, 2.0), st.floats(0.5, 1.0), st.booleans())
def test_release_invariants(steps, slo, pace, flush):
    """Any targets, changed at any emit: releases never before their token, never decreasing,
    the bank at most the target after each emit, paced while below it; late counting is the
    module docstring's (bank empty and the SLO missed) and never above no-deposit's."""
    d, plain = TokenDeposit(slo_s=slo, pace=pace), TokenDeposit(slo_s=slo, enabled=False)
    t = 0.0
    for gap, target in steps:
        t += gap
        d.target_tokens = target
        before = d.banked(t)
        prev = d.release_times[-1] if d.release_times else None
        r = d.emit(t)
        plain.emit(t)
        if target is not None:
            assert d.banked(t) <= target
        if prev is not None and (target is None or before < target):
            assert r == max(t, prev + pace * slo)  # banking: paced, as the paper's rule
    if flush:
        d.flush(t)
        assert d.banked(t) == 0 and d.release_times[-1] == t  # TPOT as without the deposit
    rel, emits = d.release_times, d.emit_times
    assert rel[0] == emits[0]
    assert all(r >= e - EPS for r, e in zip(rel, emits))
    assert all(b >= a - EPS for a, b in zip(rel, rel[1:]))
    late = sum(1 for i in range(1, len(emits)) if emits[i] > rel[i - 1] + slo + EPS)
    assert d.num_late == late <= plain.num_late
    assert d.banked(emits[-1]) == sum(1 for r in rel if r > emits[-1] + EPS)


def test_bank_target_covers_the_predicted_stalls_and_lag():
    assert bank_target(0.05, 0.1, 64) == 0  # the step meets the SLO: nothing to bank
    # one step carries a 0.25 s prefill: 0.3 s, of which the SLO covers 0.1; 0.2 / 0.09 -> 3 tokens
    assert bank_target(0.05, 0.1, 64, [0.25], pace=0.9) == 3
    assert bank_target(0.05, 0.1, 64, [0.25, 0.0, 0.25], pace=0.9) == 5  # two: 0.4 / 0.09 -> 5
    assert bank_target(0.05, 0.1, 64, [0.04]) == 0  # 0.09 s: on time without a bank
    assert bank_target(0.12, 0.1, 10) == 2  # a slow window: 10 x 20 ms of lag, 0.1 s a token
    assert bank_target(0.2, 0.1, 0, [1.0]) == 0  # nothing left to cover
    with pytest.raises(ValueError, match="slo_s"):
        bank_target(0.1, 0.0, 4)
    with pytest.raises(ValueError, match="stalls_s"):
        bank_target(0.1, 0.1, 4, [-1.0])


def test_arrival_forecast():
    f = ArrivalForecast(memory_s=10.0)
    f.note("a", 0.0, 0.3)
    assert f.stalls(1.0, 100.0) == []  # one arrival is no rate: an idle server forecasts nothing
    f.note("b", 1.0, 0.5)
    f.note("b", 1.0, 0.5)  # seen again (every replan): counted once
    f.note("c", 2.0, 0.1)
    assert f.stalls(4.0, 2.0) == [0.5]  # 2 arrivals in 4 s: one expected in 2 s, the largest prefill
    assert f.stalls(4.0, 0.9) == []  # 0.45 expected: rounds to none
    assert f.stalls(10.5, 6.0) == [0.5]  # "a" forgotten: 1 arrival over 9.5 s, 0.63 expected
    assert f.stalls(30.0, 6.0) == []  # all forgotten: the server went idle
    f.forget("b")
    f.note("b", 31.0, 0.2)  # a new request under a reused id
    with pytest.raises(ValueError, match="memory_s"):
        ArrivalForecast(memory_s=0.0)


def test_arrival_forecast_load_is_the_rate_times_the_mean_prefill():
    f = ArrivalForecast(memory_s=10.0)
    f.note("a", 0.0, 0.3)
    assert f.load(1.0) == 0.0  # one arrival is no rate
    f.note("c", 2.0, 0.1)
    f.note("b", 1.0, 0.5)  # admitted after c (it waited): kept in arrival order
    assert f.load(6.0) == pytest.approx(2 / 6 * (0.3 + 0.5 + 0.1) / 3)  # 2 arrivals in 6 s, 0.3 s each
    # over at least half the memory (5 s): three arrivals in 2 s are not a rate of one a second yet
    assert f.load(4.0) == pytest.approx(2 / 5 * 0.3)
    assert f.load(10.5) == pytest.approx(1 / 9.5 * 0.3)  # "a" forgotten: b and c over 9.5 s
    assert f.load(30.0) == 0.0  # all forgotten: the server went idle
    burst = ArrivalForecast(memory_s=10.0)
    burst.note("x", 100.0, 0.2)
    burst.note("y", 100.01, 0.2)
    assert burst.load(100.02) == pytest.approx(1 / 5 * 0.2)  # not 50 arrivals a second


# ---- through the scheduler: an idle stream is not paced ----------------------------------------
def _one(policy, **kw):
    cfg = SimConfig.build(model="llama-3.1-8b", gpu="a100-80gb", kv_policy=policy, device_kv_bytes=2 << 30, **kw)
    rec = simulate(cfg, [TraceRequest("solo", 0.0, 512, 48)]).records[0]
    assert rec.finished and len(rec.release_times) == 48
    return rec


def test_idle_stream_under_orbitflow_is_released_as_produced():
    rec = _one("orbitflow")
    gaps = [b - a for a, b in zip(rec.emit_times, rec.emit_times[1:])]
    assert max(gaps) < 0.9 * rec.tpot_slo_s  # the engine runs ahead of the pace...
    assert rec.release_times == rec.emit_times  # ...and no stall is predicted: nothing is banked
    # the paper's rule (a policy without a plan, deposit forced on) would have paced it
    paced = _one("no-offload", token_deposit=True)
    rel, ps = paced.release_times, 0.9 * paced.tpot_slo_s
    assert rel[1] - rel[0] >= ps - EPS  # paced until it finished (then its bank was flushed)
    assert all(b - a >= ps - EPS for a, b in zip(rel, rel[1:]) if b < rel[-1])
