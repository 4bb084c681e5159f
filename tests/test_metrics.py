"""The metric definitions on hand-computed cases."""

import numpy as np
import pytest

from orbitflow_ray.metrics import (RequestRecord, default_ttft_slo_s, record_from_output, summarize, tbt_over_slo,
                                   tbts_s, tpot_s, ttft_s)
from orbitflow_ray.outputs import RequestMetrics, RequestOutput
from orbitflow_ray.sampling_params import SamplingParams


def test_attainment_and_percentiles_by_hand():
    a = RequestRecord("a", 0.0, 100, (1.0, 1.1, 1.2, 1.3), tpot_slo_s=0.1, ttft_slo_s=2.0)  # all on time
    b = RequestRecord("b", 0.5, 50, (3.0, 3.5, 3.6), tpot_slo_s=0.2, ttft_slo_s=2.0)  # TTFT 2.5 late
    c = RequestRecord("c", 1.0, 10, (), tpot_slo_s=0.1, finished=False)  # failed: counted, not dropped
    m = summarize([a, b, c])
    assert m["num_requests"] == 3 and m["num_finished"] == 2 and m["num_failed"] == 1
    # paced tokens: a: 0.1, 0.1, 0.1 (on time), b: 0.5 (late), 0.1 (on time)
    assert m["tbt_attainment"] == pytest.approx(4 / 5)
    assert m["tpot_attainment"] == pytest.approx(1 / 2)  # a: 0.1 <= 0.1; b: 0.3 > 0.2
    assert m["ttft_attainment"] == pytest.approx(1 / 2)
    assert m["makespan_s"] == pytest.approx(3.6)
    assert m["throughput_tok_s"] == pytest.approx((150 + 7) / 3.6)
    assert m["goodput_req_s"] == pytest.approx(1 / 3.6)
    assert m["p50_tbt_s"] == pytest.approx(0.1)


def test_pauses_and_link_bytes():
    a = RequestRecord("a", 0.0, 10, (1.0, 2.0), tpot_slo_s=1.0, paused_s=3.0, num_pauses=2)
    m = summarize([a], link_bytes=1000)
    assert m["num_paused_requests"] == 1 and m["total_pauses"] == 2 and m["max_pause_s"] == 3.0
    assert m["link_bytes_per_output_token"] == 500


def test_tbt_per_request_is_the_p99_gap_nearest_rank():
    # 4 gaps: floor(1 % of 4) = 0 late allowed, so one late gap fails the request (its TPOT still meets).
    one_late = RequestRecord("a", 0.0, 10, (1.0, 1.1, 1.4, 1.5, 1.6), tpot_slo_s=0.2, ttft_slo_s=5.0)
    assert one_late.num_late_tbts == 1
    assert one_late.slo_met() == {"ttft": True, "tpot": True, "tbt": False}
    # 200 gaps: floor(2.0) = 2 late gaps allowed, a third fails.
    def gaps(late: int) -> tuple[float, ...]:
        steps = [0.3] * late + [0.1] * (200 - late)
        return tuple(float(t) for t in np.cumsum([1.0] + steps))
    ok, bad = (RequestRecord(f"r{n}", 0.0, 10, gaps(n), tpot_slo_s=0.25) for n in (2, 3))
    assert ok.slo_met()["tbt"] and ok.meets_all()
    assert not bad.slo_met()["tbt"] and bad.slo_met()["tpot"]  # mean 0.103 s: TPOT met, TBT not
    m = summarize([one_late, ok, bad])
    assert m["tbt_request_attainment"] == pytest.approx(1 / 3)
    assert m["tbt_attainment"] == pytest.approx((3 + 198 + 197) / (4 + 200 + 200))  # per token


def test_goodput_needs_ttft_tpot_and_tbt():
    good = RequestRecord("good", 0.0, 10, (1.0, 1.1, 1.2), tpot_slo_s=0.1, ttft_slo_s=1.0)
    late_first = RequestRecord("ttft", 0.0, 10, (1.5, 1.6, 1.7), tpot_slo_s=0.1, ttft_slo_s=1.0)
    slow = RequestRecord("tpot", 0.0, 10, (1.0, 1.2, 1.4), tpot_slo_s=0.1, ttft_slo_s=1.0)
    gap = RequestRecord("tbt", 0.0, 10, (1.0, 1.01, 1.02, 1.13), tpot_slo_s=0.1, ttft_slo_s=1.0)  # TPOT .043
    failed = RequestRecord("failed", 0.0, 10, (), tpot_slo_s=0.1, ttft_slo_s=1.0, finished=False)
    assert [r.meets_all() for r in (good, late_first, slow, gap, failed)] == [True] + [False] * 4
    assert gap.slo_met() == {"ttft": True, "tpot": True, "tbt": False}
    m = summarize([good, late_first, slow, gap, failed])
    assert m["makespan_s"] == pytest.approx(1.7)
    assert m["goodput_req_s"] == pytest.approx(1 / 1.7)
    assert m["all_slo_attainment"] == pytest.approx(1 / 5)  # failed requests count as misses here
    assert m["ttft_attainment"] == pytest.approx(3 / 4)  # of the finished ones
    assert m["p95_ttft_s"] == pytest.approx(1.0 + 0.85 * 0.5)  # [1, 1, 1, 1.5]: rank 2.85 of 0..3


def test_default_ttft_slo_rule_by_hand():
    # 2 s of prefill in 3 chunks, a 50 ms decode step, scale 1.5: 1.5 x (2 + 4 x 0.05) = 3.3 s
    assert default_ttft_slo_s(2.0, 3, 0.05, 1.5) == pytest.approx(3.3)
    assert default_ttft_slo_s(2.0, 3, 0.05, 3.0) == pytest.approx(2 * 3.3)  # the scale scales it all
    for bad in ((-1.0, 1, 0.05, 1.0), (1.0, 0, 0.05, 1.0), (1.0, 1, 0.0, 1.0), (1.0, 1, 0.05, 0.0)):
        with pytest.raises(ValueError):
            default_ttft_slo_s(*bad)


def test_engine_output_carries_the_request_ttft_slo():
    with pytest.raises(ValueError, match="ttft_slo_s"):
        SamplingParams(ttft_slo_s=0.0)
    with pytest.raises(ValueError, match="ttft_slo_s"):
        SamplingParams(ttft_slo_s=float("nan"))
    assert SamplingParams(ttft_slo_s=2.5).ttft_slo_s == 2.5
    out = RequestOutput("x", None, [1, 2, 3], "", [7, 8], True, "length",
                        RequestMetrics(10.0, [12.0, 12.1], [12.0, 12.1], slo_s=0.2, ttft_slo_s=1.5))
    rec = record_from_output(out)
    assert (rec.ttft_s, rec.ttft_slo_s, rec.tpot_slo_s) == (pytest.approx(2.0), 1.5, 0.2)
    assert rec.slo_met() == {"ttft": False, "tpot": True, "tbt": True}


def test_one_definition_of_ttft_tbt_tpot_for_engine_outputs_and_records():
    """latency.py by hand; RequestMetrics (emission times) and RequestRecord (release times) use it."""
    times = [12.0, 12.25, 12.75, 13.0]
    assert ttft_s(10.0, times) == 2.0 and tpot_s(times) == pytest.approx(1.0 / 3)
    assert tbts_s(times).tolist() == [0.25, 0.5, 0.25]
    assert ttft_s(10.0, []) is None and tpot_s([12.0]) is None and tbts_s([12.0]).size == 0
    m = RequestMetrics(10.0, times, [12.5, 12.75, 13.0, 13.5])
    assert (m.ttft, m.tbts, m.tpot) == (2.0, [0.25, 0.5, 0.25], tpot_s(times))
    rec = record_from_output(RequestOutput("r", None, [1, 2], "", [3] * 4, True, "length", m))
    assert rec.ttft_s == 2.5 and rec.tpot_s == pytest.approx(1.0 / 3) and rec.tbts.tolist() == [0.25, 0.25, 0.5]


def test_tbt_over_slo_samples_are_sorted_ratios_of_finished_requests():
    recs = [RequestRecord("a", 0.0, 1, (1.0, 1.2, 1.3), 0.1), RequestRecord("b", 0.0, 1, (1.0, 1.5), 0.5),
            RequestRecord("c", 0.0, 1, (1.0, 9.0), 0.1, finished=False)]
    assert tbt_over_slo(recs) == pytest.approx([1.0, 1.0, 2.0])
    assert len(tbt_over_slo(recs, k=2)) == 2 and tbt_over_slo(recs[2:]) == []
