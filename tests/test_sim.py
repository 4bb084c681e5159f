"""The simulator runs the real scheduler and policies on a roofline: conservation, capacity,
determinism, and the CLI."""

import json

import pytest

from orbitflow_ray.cli import main
from orbitflow_ray.sim.simulator import SimConfig, simulate
from orbitflow_ray.sim.workload import TraceRequest, WorkloadConfig, generate

POLICIES = ["orbitflow", "no-offload", "all-offload", "static-uniform", "flexgen-plus", "select-n",
            "orbitflow-uniform", "orbitflow-no-deposit", "orbitflow-no-pause"]


@pytest.fixture(scope="module")
def trace():
    return generate(WorkloadConfig(length="longbench", rate_per_s=2.0, num_requests=16, max_input_tokens=16_000,
                                   seed=3))


def config(policy, **kw):
    # 2 GiB of KV: about 16K tokens of Llama-3.1-8B, far below the trace's demand.
    return SimConfig(model="llama-3.1-8b", gpu="a100-80gb", kv_policy=policy, device_kv_bytes=2 << 30, **kw)


@pytest.mark.parametrize("policy", POLICIES)
def test_conservation_and_capacity(policy, trace):
    r = simulate(config(policy), trace)
    m = r.metrics
    by_id = {t.request_id: t for t in trace}
    assert m["num_requests"] == len(trace) == len(r.records)
    assert m["num_finished"] + m["num_failed"] == len(trace)
    for rec in r.records:
        if rec.finished:  # every token counted once, in time order
            assert len(rec.release_times) == by_id[rec.request_id].output_tokens
            assert list(rec.release_times) == sorted(rec.release_times)
            assert rec.release_times[0] >= rec.arrival_s
    assert 0 <= m["peak_device_kv_bytes"] <= m["device_kv_capacity_bytes"]
    assert m["num_finished"] == len(trace)  # nothing here is infeasible on arrival


def test_offloading_policies_move_bytes(trace):
    assert simulate(config("all-offload"), trace).metrics["link_bytes_per_output_token"] > 0


def test_deterministic_under_a_seed(trace):
    a, b = (simulate(config("orbitflow", pause_strategy="random", seed=7), trace) for _ in range(2))
    assert [r.release_times for r in a.records] == [r.release_times for r in b.records]
    assert a.metrics == b.metrics


def test_infeasible_requests_are_reported_failed():
    huge = [TraceRequest("big", 0.0, 120_000, 10), TraceRequest("ok", 0.0, 100, 5)]
    r = simulate(config("no-offload"), huge)
    assert r.metrics["num_failed"] == 1 and r.metrics["num_finished"] == 1
    assert [rec.finished for rec in r.records if rec.request_id == "big"] == [False]


def test_slo_is_a_scale_of_the_full_capacity_step():
    one, two = (simulate(config("no-offload", slo_scale=s), []).tpot_slo_s for s in (1.0, 2.0))
    assert two == pytest.approx(2 * one) and 1e-3 < one < 1.0


def test_cli_simulate_and_compare(tmp_path, capsys):
    assert main(["simulate", "--policy", "orbitflow", "--workload", "sharegpt", "--num-requests", "8",
                 "--rate", "4", "--device-kv-bytes", "1GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runs"][0]["policy"] == "orbitflow" and out["runs"][0]["metrics"]["num_requests"] == 8
    assert main(["compare", "--policies", "orbitflow,all-offload", "--rates", "1,4", "--num-requests", "6",
                 "--device-kv-bytes", "1GiB", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {(r["policy"], r["rate"]) for r in report["runs"]} == {
        (p, r) for p in ("orbitflow", "all-offload") for r in (1.0, 4.0)}
    assert (tmp_path / "report.md").exists() and (tmp_path / "attainment_vs_rate.png").exists()
    assert main(["simulate", "--list"]) == 0
    assert "llama-3.1-8b" in capsys.readouterr().out
