"""Synthetic workloads and JSONL traces for the simulator (fast, numpy only)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orbitflow_ray.sim.workload import (ArrivalKind, LengthKind, TraceRequest, WorkloadConfig,
                                        apply_slo_scale, arrival_times, generate, load_trace,
                                        save_trace, scale_rate)


def _gaps(kind, rate, cv, n=5000, seed=1):
    times = arrival_times(kind, rate, n, cv=cv, rng=np.random.default_rng(seed))
    assert times[0] == 0.0 and len(times) == n
    return np.diff(times)


def test_same_seed_same_trace_other_seed_other_trace():
    cfg = dict(arrival="lognormal", rate_per_s=2.0, num_requests=200, length="longbench")
    assert generate(WorkloadConfig(**cfg, seed=7)) == generate(WorkloadConfig(**cfg, seed=7))
    assert generate(WorkloadConfig(**cfg, seed=7)) != generate(WorkloadConfig(**cfg, seed=8))
    trace = generate(WorkloadConfig(**cfg))
    assert [r.request_id for r in trace[:2]] == ["req-0000", "req-0001"] and len(trace) == 200


def test_length_distribution_does_not_move_arrivals():
    a = generate(WorkloadConfig(length="sharegpt", seed=3))
    b = generate(WorkloadConfig(length="fixed", input_tokens=10, output_tokens=5, seed=3))
    assert [r.arrival_s for r in a] == [r.arrival_s for r in b]


@pytest.mark.parametrize("kind,cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 2.0),
                                     ("lognormal", 1.0), ("lognormal", 0.5)])
def test_gap_mean_and_cv(kind, cv):
    gaps = _gaps(kind, rate=4.0, cv=cv)
    assert gaps.mean() == pytest.approx(0.25, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_duration_mode_stops_at_duration():
    trace = generate(WorkloadConfig(arrival="poisson", rate_per_s=5.0, duration_s=200.0))
    assert all(r.arrival_s < 200.0 for r in trace)
    assert len(trace) == pytest.approx(1000, rel=0.1)


def test_sharegpt_means_and_bounds():
    trace = generate(WorkloadConfig(length="sharegpt", num_requests=5000))
    inp = np.array([r.input_tokens for r in trace])
    out = np.array([r.output_tokens for r in trace])
    assert inp.mean() == pytest.approx(1000, rel=0.1) and out.mean() == pytest.approx(250, rel=0.1)
    assert 4 <= inp.min() and inp.max() <= 16 << 10 and 1 <= out.min() and out.max() <= 2 << 10
    capped = generate(WorkloadConfig(length="sharegpt", num_requests=2000, max_input_tokens=512))
    assert max(r.input_tokens for r in capped) == 512


@pytest.mark.parametrize("cap,lo", [(None, 4 << 10), (1 << 20, 4 << 10), (8 << 10, 4 << 10),
                                    (2 << 10, 2 << 10)])
def test_longbench_bounds_follow_the_cap(cap, lo):
    trace = generate(WorkloadConfig(length="longbench", num_requests=2000, max_input_tokens=cap))
    hi = cap or 128 << 10
    inp = np.array([r.input_tokens for r in trace])
    assert lo <= inp.min() and inp.max() <= hi
    assert inp.max() > hi * 0.8  # log-uniform reaches the top of the range
    assert all(64 <= r.output_tokens <= 512 for r in trace)


def test_fixed_and_uniform():
    fixed = generate(WorkloadConfig(length="fixed", input_tokens=100, output_tokens=7, num_requests=5))
    assert {(r.input_tokens, r.output_tokens) for r in fixed} == {(100, 7)}
    uni = generate(WorkloadConfig(length="uniform", min_input_tokens=10, max_input_tokens=20,
                                  max_output_tokens=3, num_requests=500))
    assert {r.input_tokens for r in uni} == set(range(10, 21))
    assert {r.output_tokens for r in uni} == {1, 2, 3}


def test_pressure_outputs_outlast_the_plan_windows():
    trace = generate(WorkloadConfig(length="pressure", num_requests=300, seed=1))
    assert min(r.input_tokens for r in trace) >= 256 and max(r.input_tokens for r in trace) <= 1024
    assert min(r.output_tokens for r in trace) >= 2048 and max(r.output_tokens for r in trace) <= 4096
    assert all(r.output_tokens > r.input_tokens for r in trace)  # KV grows past what was admitted


def test_slos_from_config():
    trace = generate(WorkloadConfig(num_requests=3, tpot_slo_s=0.1, ttft_slo_s=2.0))
    assert all(r.tpot_slo_s == 0.1 and r.ttft_slo_s == 2.0 for r in trace)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rate=st.floats(0.01, 100.0),
       arrival=st.sampled_from(list(ArrivalKind)), cv=st.floats(0.2, 3.0),
       length=st.sampled_from([LengthKind.SHAREGPT, LengthKind.LONGBENCH, LengthKind.UNIFORM]),
       cap=st.integers(1, 1 << 20), n=st.integers(0, 60))
def test_any_config_gives_sorted_arrivals_and_bounded_lengths(seed, rate, arrival, cv, length, cap, n):
    cv = 1.0 if arrival is ArrivalKind.POISSON else cv
    extra = {"max_output_tokens": 64} if length is LengthKind.UNIFORM else {}
    trace = generate(WorkloadConfig(arrival=arrival, rate_per_s=rate, cv=cv, num_requests=n,
                                    length=length, max_input_tokens=cap, seed=seed, **extra))
    assert len(trace) == n
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals) and (n == 0 or arrivals[0] == 0.0)
    assert all(1 <= r.input_tokens <= cap and r.output_tokens >= 1 for r in trace)


def test_jsonl_round_trip(tmp_path):
    trace = apply_slo_scale(generate(WorkloadConfig(num_requests=30, ttft_slo_s=3.0)), 0.05, 1.5)
    trace[4] = TraceRequest(trace[4].request_id, trace[4].arrival_s, 9, 9)  # no SLOs: left out
    path = tmp_path / "trace.jsonl"
    save_trace(trace, path)
    assert "tpot_slo_s" not in path.read_text().splitlines()[4]
    assert load_trace(path) == trace


def test_load_sorts_fills_ids_and_skips_blank_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 2.5, "input_tokens": 10, "output_tokens": 4.0}\n\n'
                    '{"arrival_s": 1, "input_tokens": 3, "output_tokens": 1, "request_id": "x"}\n')
    trace = load_trace(path)
    assert [r.request_id for r in trace] == ["x", "req-0000"]
    assert trace[1].output_tokens == 4 and trace[0].arrival_s == 1.0


@pytest.mark.parametrize("line,problem", [
    ('{"arrival_s": 1.0, "input_tokens": 10', "invalid JSON"),
    ('[1, 2, 3]', "expected a JSON object"),
    ('{"arrival_s": 1.0, "input_tokens": 10}', "missing 'output_tokens'"),
    ('{"arrival_s": 1.0, "input_tokens": 0, "output_tokens": 1}', "input_tokens must be"),
    ('{"arrival_s": -1, "input_tokens": 1, "output_tokens": 1}', "arrival_s must be"),
    ('{"arrival_s": "soon", "input_tokens": 1, "output_tokens": 1}', "arrival_s must be a number"),
    ('{"arrival_s": 1, "input_tokens": 1.5, "output_tokens": 1}', "input_tokens must be"),
    ('{"arrival_s": 1, "input_tokens": 1, "output_tokens": 1, "tpot_slo_s": 0}', "tpot_slo_s must"),
    ('{"arrival_s": 1, "input_tokens": 1, "output_tokens": 1, "tpot_slo": 0.1}', "unknown field"),
    ('{"arrival_s": 1, "input_tokens": 1, "output_tokens": 1, "request_id": "a"}', "duplicate"),
])
def test_bad_lines_name_line_number_and_problem(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"arrival_s": 0.0, "input_tokens": 5, "output_tokens": 5, "request_id": "a"})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{problem}"):
        load_trace(path)


def test_scale_rate_keeps_requests_and_divides_arrivals():
    trace = generate(WorkloadConfig(num_requests=40, tpot_slo_s=0.2))
    fast = scale_rate(trace, 4.0)
    assert [(r.request_id, r.input_tokens, r.output_tokens, r.tpot_slo_s) for r in fast] == \
           [(r.request_id, r.input_tokens, r.output_tokens, r.tpot_slo_s) for r in trace]
    assert [r.arrival_s for r in fast] == pytest.approx([r.arrival_s / 4.0 for r in trace])
    with pytest.raises(ValueError, match="factor"):
        scale_rate(trace, 0.0)


def test_apply_slo_scale_fills_only_missing_slos():
    trace = [TraceRequest("a", 0.0, 10, 10), TraceRequest("b", 1.0, 10, 10, tpot_slo_s=9.0)]
    out = apply_slo_scale(trace, base_step_s=0.04, scale=2.5)
    assert out[0].tpot_slo_s == pytest.approx(0.1) and out[1].tpot_slo_s == 9.0
    assert trace[0].tpot_slo_s is None  # input untouched
    with pytest.raises(ValueError, match="scale"):
        apply_slo_scale(trace, 0.04, 0.0)
    with pytest.raises(ValueError, match="base_step_s"):
        apply_slo_scale(trace, -1.0, 1.0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(rate_per_s=-1.0), "rate_per_s must be positive"),
    (dict(rate_per_s=0.0), "rate_per_s must be positive"),
    (dict(arrival="gamma", cv=0.0), "cv must be positive"),
    (dict(arrival="lognormal", cv=-2.0), "cv must be positive"),
    (dict(arrival="poisson", cv=2.0), "poisson arrivals have CV 1"),
    (dict(arrival="weibull"), r"unknown arrival process 'weibull'; choose one of \['poisson', "
                              r"'gamma', 'lognormal'\]"),
    (dict(length="alpaca"), r"unknown length distribution 'alpaca'; choose one of \['sharegpt', "
                            r"'longbench', 'fixed', 'uniform', 'pressure'\]"),
    (dict(num_requests=5, duration_s=10.0), "not both"),
    (dict(num_requests=-1), "num_requests"),
    (dict(duration_s=0.0), "duration_s"),
    (dict(tpot_slo_s=0.0), "tpot_slo_s"),
    (dict(length="fixed", input_tokens=100), "needs output_tokens"),
    (dict(length="uniform", max_input_tokens=10), "needs max_output_tokens"),
    (dict(length="longbench", input_tokens=100), "does not use input_tokens"),
    (dict(length="longbench", min_input_tokens=9000, max_input_tokens=8000), "exceeds"),
    (dict(length="sharegpt", max_output_tokens=0), "max_output_tokens must be"),
])
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorkloadConfig(**kwargs)


def test_config_help_and_dict():
    help_ = WorkloadConfig.field_help()
    assert help_["cv"] and "lengths" not in help_
    d = WorkloadConfig(arrival="gamma", cv=2.0).to_dict()
    assert d["arrival"] == "gamma" and d["num_requests"] == 50
    assert WorkloadConfig(**d).to_dict() == d
    json.dumps(d)


def test_trace_request_validation():
    with pytest.raises(ValueError, match="output_tokens"):
        TraceRequest("a", 0.0, 1, 0)
    with pytest.raises(ValueError, match="ttft_slo_s"):
        TraceRequest("a", 0.0, 1, 1, ttft_slo_s=-1.0)
