"""Token-Deposit's join wait: an arrival whose prefill would stall running streams past their TBT
SLO waits, within its TTFT slack, while their banks grow to cover the stall
(`admission.bank_wait_s`, `OrbitFlow._waits_for_banks`): hand-checked waits, the policy's
decision and bank targets, and a simulated trace where the wait turns late gaps into none."""

import math
from dataclasses import replace

import pytest

from orbitflow_ray.config import EngineConfig
from orbitflow_ray.kv.tier_manager import KVTierManager
from orbitflow_ray.request import Request
from orbitflow_ray.sampling_params import SamplingParams
from orbitflow_ray.sched.scheduler import Scheduler

from orbitflow_ray.costmodel import CostModel, OnlineCostModel
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner import make_policy
from orbitflow_ray.planner.admission import bank_wait_s, prefill_stalls_s, tbt_broken
from orbitflow_ray.planner.base import CapacityView, RequestView
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.sim.workload import WorkloadConfig, generate
from load_tests.predict import predict

D = Tier.DEVICE
SLO_S = 0.010
PACE = 0.9


def cost():
    """L = 4; per layer 1 ms + 1 us per context token (decode), 0.1 ms per computed token: a decode
    step of one request at 100 tokens is 4 x (1 + 0.1 + 0.1) ms = 4.8 ms; a 50-token prefill chunk
    adds 4 x 50 x 0.1 ms = 20 ms."""
    return OnlineCostModel(CostModel(4, compute_a_s=1e-3, compute_b_s_per_token=1e-6,
                                     compute_p_s_per_token=1e-4, link_bytes_per_s=1e9))


def running(outputs=5, left=95, banked=0, late=0, ttft_slack=None):
    """A decoding request: 100 tokens of context, `outputs` tokens out, `left` to go."""
    return RequestView("r0", 100, 100 - outputs, outputs + left, 0.0, (D,) * 4, outputs, SLO_S, banked,
                       None, 99, ttft_slack, late)


def arrival(prompt=51, ttft_slack=1.0):
    return RequestView("a", prompt, prompt, 16, 1.0, None, 0, SLO_S, 0, None, 0, ttft_slack)


def wait(run, arr=None, margin=1.0):
    return bank_wait_s(arr or arrival(), [run], 4, cost(), 1024, PACE, SLO_S, stall_margin=margin)


def test_prefill_stalls_are_one_per_chunk():
    assert prefill_stalls_s(arrival(2501), 4, cost(), 1024) == pytest.approx([0.4096, 0.4096, 0.1808])
    assert prefill_stalls_s(arrival(1), 4, cost(), 1024) == []  # nothing left to prefill


def test_wait_is_the_steps_the_bank_needs_to_grow():
    # bank_target: (4.8 + 20 - 10) / (0.9 x 10) = 1.64 -> 2 tokens; the bank grows by
    # 1 - 4.8 / 9 = 0.467 a step -> ceil(2 / 0.467) = 5 steps of 4.8 ms
    s, stalls = wait(running())
    assert stalls == pytest.approx([0.020])
    assert s == pytest.approx(5 * 0.0048)
    assert wait(running(banked=1))[0] == pytest.approx(math.ceil(1 / (1 - 4.8 / 9)) * 0.0048)
    assert wait(running(banked=2))[0] == 0.0  # covered already


def test_stall_margin_lengthens_the_stalls():
    # 25 ms: (4.8 + 25 - 10) / 9 = 2.2 -> 3 tokens -> ceil(3 / 0.467) = 7 steps
    s, stalls = wait(running(), margin=1.25)
    assert stalls == pytest.approx([0.025]) and s == pytest.approx(7 * 0.0048)


def test_who_is_not_hurt():
    assert wait(running(outputs=0))[0] == 0.0  # no token yet: TBT has not started
    assert wait(running(ttft_slack=-1.0))[0] == 0.0  # TTFT missed: counts for nothing
    # 249 gaps allow 2 late: one more late gap is absorbed, a third breaks the SLO, a fourth was lost before
    assert wait(running(outputs=150, left=100))[0] == 0.0
    assert wait(running(outputs=150, left=100, late=2))[0] == pytest.approx(5 * 0.0048)
    assert wait(running(outputs=150, left=100, late=3))[0] == 0.0
    # finishing in 3 steps, before its bank could cover the stall: the wait ends when it does
    assert wait(running(left=3))[0] == pytest.approx(3 * 0.0048)
    assert wait(running(), arrival(prompt=1))[0] == 0.0  # nothing to prefill, no stall
    # steps of 9.5 ms against a 9 ms pace: the bank cannot grow, waiting cannot help
    assert math.isinf(bank_wait_s(arrival(), [running()], 4, cost(), 1024, PACE, SLO_S, step_s=0.0095)[0])


def broken(run):
    return tbt_broken(arrival(), [run], 4, cost(), 1024, SLO_S, PACE)


def test_tbt_broken_names_the_streams_a_join_would_break_now():
    """The admission's side of the same rule (`tbt_broken`): who the join's 20 ms stall breaks with
    the banks as they are (the bank wait above waits for them to grow instead)."""
    assert broken(running()) == {"r0"}
    assert broken(running(banked=1)) == {"r0"} and broken(running(banked=2)) == set()  # 2 tokens cover it
    assert broken(running(outputs=0)) == set() and broken(running(ttft_slack=-1.0)) == set()
    assert broken(running(outputs=150, left=100)) == set()  # 2 late gaps allowed: absorbed
    assert broken(running(outputs=150, left=100, late=2)) == {"r0"}
    assert broken(running(outputs=150, left=100, late=3)) == set()  # its TBT is lost already


def policy(name="orbitflow"):
    return make_policy(name, 4, cost_model=cost(), slo_s=SLO_S, solve_ahead=False, windows=(16,))


CAP = CapacityView(4, 4, 100, 1000, 1000, 10_000, 10_000)


def test_orbitflow_waits_for_the_banks_then_joins():
    p = policy()
    run = running()
    p.replan([run], CAP)
    assert p.deposit_target("r0") == 0  # nothing to cover yet: the stream goes out as produced
    assert p.admit(arrival(), [run], CAP) is None  # its 20 ms stall would make r0's gap late
    assert p.counters["bank_wait_steps"] == 1
    p.replan([run], CAP)
    need = p.deposit_target("r0")
    assert need >= 2  # the bank now grows for the waiting arrival's stall
    plan = p.admit(arrival(), [running(banked=need)], CAP)  # covered: it joins
    assert plan is not None and "a" in plan.placements
    assert p.counters["bank_wait_steps"] == 1
    p.replan([running(banked=need)], CAP)
    assert p.deposit_target("r0") < need  # the arrival joined: its stall is no longer banked for


def test_no_wait_past_the_ttft_slack_or_in_the_ablation():
    run = running()
    p = policy()
    p.replan([run], CAP)
    # 20 ms of its own prefill plus a ~24 ms wait do not fit 30 ms of TTFT slack: it joins now
    assert p.admit(arrival(ttft_slack=0.030), [run], CAP) is not None
    assert p.counters["bank_wait_steps"] == 0
    q = policy("orbitflow-no-bank-wait")
    q.replan([run], CAP)
    # no bank wait in the ablation; its admission still refuses a join whose stall breaks r0's TBT
    # (99 gaps allow none late) while waiting until r0 finishes (95 x 4.8 ms) keeps the arrival's TTFT
    assert q.admit(arrival(), [run], CAP) is None and q.counters["bank_wait_steps"] == 0
    assert q.admit(arrival(ttft_slack=0.1), [run], CAP) is not None  # waiting would lose its TTFT: a tie, it joins


def test_no_wait_with_a_queue_behind():
    # holding a head with requests queued behind it bunches their joins up after it: no bank wait;
    # the admission decides alone (`admission.join_costs`): r0's TBT (99 gaps allow none late) would
    # break and waiting until r0 finishes keeps the arrival's TTFT, so it waits; with 0.1 s of slack
    # waiting would lose its TTFT, a tie, and it joins
    p = policy()
    run = running()
    p.replan([run], CAP)
    assert p.admit(replace(arrival(), num_waiting_behind=1), [run], CAP) is None
    assert p.admit(replace(arrival(ttft_slack=0.1), num_waiting_behind=1), [run], CAP) is not None
    assert p.counters["bank_wait_steps"] == 0


def test_the_scheduler_tells_the_head_how_many_wait_behind_it():
    config = EngineConfig(model="tiny-llama", kv_policy="orbitflow", block_size=4)
    seen = []

    class Spy(type(policy())):
        def admit(self, req, running, cap):
            seen.append((req.request_id, req.num_waiting_behind))
            return None  # nobody joins: the head stays the head

    spy = Spy(4, cost_model=cost(), slo_s=SLO_S, solve_ahead=False, windows=(16,))
    s = Scheduler(config, KVTierManager(4, 4, 100, 64, 64), spy, frozenset({0}), 10_000, clock=lambda: 2.0)
    for i in range(3):
        s.add_request(Request(f"w{i}", [5] * 10, SamplingParams(max_tokens=4), arrival_time=0.0))
    s.schedule()
    assert seen == [("w0", 2)]


# The load test of docs/results.md (item 5 of issue 14) replayed in the simulator on this
# machine's calibrated spec: SmolLM2-135M on the CPU, 48 MiB of device KV, 500-1,000-token prompts
# at 0.2 req/s, TPOT/TBT SLO 0.25 s, TTFT SLO 10 s. A prompt's prefill takes about a second, four
# SLOs, so every join stalls the streams running then.
APP = {"model": "smollm2-135m", "default_ttft_slo_s": 10.0,
       "engine": {"backend": "cpu", "device_kv_bytes": 48 << 20, "host_kv_bytes": 1 << 30,
                  "link_bandwidth_bytes_per_s": 2e9, "tpot_slo_s": 0.25}}


def _replay(seed):
    trace = generate(WorkloadConfig(arrival="poisson", rate_per_s=0.2, duration_s=60, length="longbench",
                                    seed=seed, min_input_tokens=500, max_input_tokens=1000,
                                    min_output_tokens=32, max_output_tokens=64))
    out = {}
    for name in ("orbitflow", "orbitflow-no-bank-wait"):
        app = AppArgs.model_validate({**APP, "engine": {**APP["engine"], "kv_policy": name}})
        p = predict(trace, app)
        assert len(p.records) == len(trace) and all(r.finished for r in p.records)
        out[name] = p
    return out


def test_with_the_wait_the_seeds_lose_no_tbt_or_goodput_in_all():
    """Seeds 0-2 together: with the wait no more late gaps and no less goodput than without it;
    on seed 0 (nobody queues, so every join can wait for the banks) every request keeps its TBT and
    TTFT. Without the wait, the `slo` admission refuses the joins that would break a stream's TBT
    (`tbt_broken`), so here the ablation loses little TBT either (before that: 4, 6 and 2 requests
    lost their TBT on seeds 0-2, and goodput was 0.12-0.16 against 0.18-0.22 req/s). Seed by seed it
    is not a win everywhere: since the SLOs are planned less the arrivals' prefill load (stop 40),
    seed 1 has one late gap with the wait and none without (0.202 against 0.215 req/s), seed 0 the
    other way round (0.185 against 0.168); the three together tie on late gaps, 1 and 1."""
    replays = {seed: _replay(seed) for seed in range(3)}
    assert all(r.slo_met()["tbt"] and r.slo_met()["ttft"] for r in replays[0]["orbitflow"].records)
    late = {k: sum(r.num_late_tbts for runs in replays.values() for r in runs[k].records)
            for k in ("orbitflow", "orbitflow-no-bank-wait")}
    goodput = {k: sum(runs[k].metrics["goodput_req_s"] for runs in replays.values())
               for k in ("orbitflow", "orbitflow-no-bank-wait")}
    assert late["orbitflow"] <= late["orbitflow-no-bank-wait"], late
    assert goodput["orbitflow"] >= goodput["orbitflow-no-bank-wait"], goodput


@pytest.mark.parametrize("name", ["no-offload", "flexgen-plus", "static-uniform", "orbitflow-no-bank-wait"])
def test_every_policy_with_slo_admission_weighs_the_streams_a_join_breaks(name):
    def admit(arr, run, admission="slo"):
        p = make_policy(name, 4, admission=admission, cost_model=cost(), slo_s=SLO_S)
        p.replan([run], CAP)
        return p.admit(arr, [run], CAP)

    assert admit(arrival(), running()) is None  # breaks r0's TBT; waiting keeps its TTFT
    assert admit(arrival(), running(banked=2)) is not None  # a bank that covers the stall
    assert admit(arrival(ttft_slack=0.1), running()) is not None  # waiting would lose its TTFT: a tie
    assert admit(arrival(), running(), admission="fcfs") is not None


def test_a_refusal_stands_until_the_batch_changes():
    """OrbitFlow remembers a refusal while the batch, its TTFT misses and the request's TTFT at
    stake are unchanged (`OrbitFlow.admit`): a bank that grows meanwhile does not lift it (the bank
    wait is the path for that). Lifting it when the banks cover the stall measured worse in the
    simulator at SLO scale 1 (8b-a100-sharegpt, 2 req/s, 3 seeds: 0.64 against 0.81 req/s)."""
    p = policy("orbitflow-no-bank-wait")
    p.replan([running()], CAP)
    assert p.admit(arrival(), [running()], CAP) is None
    assert p.admit(arrival(), [running(banked=2)], CAP) is None
    r1 = replace(running(outputs=150, left=100), request_id="r1")  # one that can absorb the late gap
    assert p.admit(arrival(), [running(banked=2), r1], CAP) is not None  # a new batch: judged again
