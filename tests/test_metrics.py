"""The metric definitions on hand-computed cases."""

import pytest

from orbitflow_ray.metrics import RequestRecord, summarize


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
