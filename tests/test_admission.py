"""Admission as its own component: `fcfs` and `slo` on hand-built views with a known answer (which
requests join, in which order, at which placement), on a static, a batch-uniform and the OrbitFlow
policy; the config plumbing; and every registered policy with each admission in the simulator."""

from dataclasses import replace

import pytest

from orbitflow_ray.config import ADMISSIONS, EngineConfig
from orbitflow_ray.costmodel import CostModel, OnlineCostModel
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner import available_policies, make_policy, policy_from_config
from orbitflow_ray.planner.admission import (AdmissionKind, available_admissions, batch_plan_inputs, distance_like,
                                            fits_device_for_life, late_alone, lifetime_peak, make_admission,
                                            shared_prefill_s, ttft_at_stake, ttft_delayed)
from orbitflow_ray.planner.base import CapacityView, RequestView, StepStats
from orbitflow_ray.planner.deposit import ArrivalForecast
from orbitflow_ray.planner.orbitflow import tiers_for_distance
from orbitflow_ray.planner.static import uniform_placement
from orbitflow_ray.sim.simulator import SimConfig, simulate
from orbitflow_ray.sim.workload import TraceRequest

H = Tier.HOST
# The default SLO of these tests: 6 ms. With the cost model below an all-device decode step of N
# batch context tokens takes 4 x (1 ms + N us): 5.6 ms at 400 tokens (on time), 6.4 ms at 600 (late).
SLO_S = 0.006


def cost():
    """L = 4; 1 ms + 1 us per context token per layer; one host layer of a 200-token request is
    5,000 bytes at 1 MB/s, 5 ms: any offload of these requests misses a 6 ms SLO."""
    return OnlineCostModel(CostModel(4, compute_a_s=1e-3, compute_b_s_per_token=1e-6,
                                     compute_p_s_per_token=0.0, link_bytes_per_s=1e6))


def policy(name, admission, slo_s=SLO_S):
    return make_policy(name, 4, cost_model=cost(), slo_s=slo_s, admission=admission, solve_ahead=False,
                       windows=(16,))


def view(i, num_tokens):
    """A request in decode (no prefill owed), 16 tokens left, arrived at i seconds."""
    return RequestView(f"r{i}", num_tokens, num_tokens, 16, float(i), None)


def cap(device_blocks):
    """4 tokens per block, 25 bytes per token per layer."""
    return CapacityView(4, 4, 100, device_blocks, device_blocks, 10_000, 10_000)


QUEUE = [view(0, 200), view(1, 200), view(2, 200), view(3, 50)]  # in arrival order


def admit_in_order(p, queue, capacity):
    """What the scheduler does with its waiting queue: offer requests in arrival order, stop at the
    first refused. Returns (request id, host layers of its placement) per admitted request."""
    running, admitted = [], []
    for v in queue:
        plan = p.admit(v, running, capacity)
        if plan is None:
            break
        tiers = plan.placements[v.request_id]
        running = [replace(r, placement=tuple(plan.placements.get(r.request_id, r.placement))) for r in running]
        running.append(replace(v, placement=tuple(tiers)))
        admitted.append((v.request_id, tiers.count(H)))
    return admitted, running


def test_no_offload_fcfs_admits_while_it_fits_slo_while_the_step_meets_the_slo():
    fcfs, _ = admit_in_order(policy("no-offload", "fcfs"), QUEUE, cap(10_000))
    assert fcfs == [("r0", 0), ("r1", 0), ("r2", 0), ("r3", 0)]
    p = policy("no-offload", "slo")
    slo, running = admit_in_order(p, QUEUE, cap(10_000))
    assert slo == [("r0", 0), ("r1", 0)]  # r2 would make the step 6.4 ms: all three late
    # The judgement is per request: the short r3 (450 tokens, 5.8 ms) would join; the scheduler's
    # arrival order keeps it behind r2.
    assert p.admit(QUEUE[3], running, cap(10_000)) is not None
    assert p.metrics() == {"admission_admitted": 3, "admission_refused": 1}


def test_no_offload_slo_admits_into_an_empty_batch_whatever_the_slo():
    p = policy("no-offload", "slo", slo_s=1e-6)
    assert p.admit(QUEUE[0], [], cap(10_000)).placements == {"r0": [Tier.DEVICE] * 4}


@pytest.mark.parametrize("name", ["no-offload", "orbitflow"])
def test_slo_lets_a_request_late_even_alone_join_unless_it_makes_others_late(name):
    # A 5 ms SLO: one 400-token request alone steps 4 x (1 ms + 400 us) = 5.6 ms, late whatever
    # runs; a 100-token one 4.4 ms, on time alone.
    p, big = policy(name, "slo", slo_s=0.005), cap(10_000)
    assert late_alone(view(1, 400), big, 4, cost(), 0.005, (16,))
    assert not late_alone(view(1, 100), big, 4, cost(), 0.005, (16,))
    late, _ = admit_in_order(p, [view(0, 400), view(1, 400), view(2, 400)], big)
    assert [rid for rid, _ in late] == ["r0", "r1", "r2"]  # each late alone: waiting saves nobody
    on_time, _ = admit_in_order(policy(name, "slo", slo_s=0.005), [view(0, 100), view(1, 400)], big)
    assert [rid for rid, _ in on_time] == ["r0"]  # r1 would make r0 late: it waits


def test_flexgen_plus_fcfs_offloads_to_admit_slo_waits():
    # 420 device blocks: two 200-token requests (51 blocks per layer each next step) fit all on
    # device (408); three need half the layers on host (2 x 153 = 306), which costs 5 ms per host
    # layer per request over the link.
    fcfs, _ = admit_in_order(policy("flexgen-plus", "fcfs"), QUEUE, cap(420))
    assert fcfs == [("r0", 0), ("r1", 0), ("r2", 2), ("r3", 2)]
    slo, _ = admit_in_order(policy("flexgen-plus", "slo"), QUEUE, cap(420))
    assert slo == [("r0", 0), ("r1", 0)]
    # With a loose SLO the offload costs no SLO, and slo admits what fcfs does.
    loose, _ = admit_in_order(policy("flexgen-plus", "slo", slo_s=1.0), QUEUE, cap(420))
    assert loose == fcfs


def test_static_uniform_slo_keeps_the_first_and_refuses_a_second_offloaded_request():
    fcfs, _ = admit_in_order(policy("static-uniform", "fcfs"), QUEUE, cap(10_000))
    assert fcfs == [("r0", 2), ("r1", 2), ("r2", 2), ("r3", 2)]
    # r0 alone is already late (its host layers stall the step); r1 would make both late.
    slo, _ = admit_in_order(policy("static-uniform", "slo"), QUEUE, cap(10_000))
    assert slo == [("r0", 2)]


def test_orbitflow_native_is_slo_and_fcfs_is_its_ablation():
    assert make_policy("orbitflow", 4, solve_ahead=False).admission.kind is AdmissionKind.SLO
    assert make_policy("no-offload", 4).admission.kind is AdmissionKind.FCFS
    # 440 blocks hold r0 and r1 all on device to the window's end (2 x 4 x 54 = 432); r2 joins
    # only by offloading, which misses the SLO: slo refuses it, fcfs plans it in (the placement
    # still the plan's: some layers on host).
    native, _ = admit_in_order(policy("orbitflow", None), QUEUE, cap(440))
    slo, _ = admit_in_order(policy("orbitflow", "slo"), QUEUE, cap(440))
    assert native == slo == [("r0", 0), ("r1", 0)]
    p = policy("orbitflow", "fcfs")
    fcfs, running = admit_in_order(p, QUEUE, cap(440))
    assert [rid for rid, _ in fcfs] == ["r0", "r1", "r2", "r3"]
    assert fcfs[2][1] > 0
    assert p.plan.violations  # admitted although the plan predicts misses
    assert sorted(p.plan.distances) == ["r0", "r1", "r2", "r3"]
    # The router's damage follows the admission: none under fcfs (it joins), counted under slo.
    assert p.admission_damage([view(4, 10)], running[:2], cap(440)) == [0.0]


def test_orbitflow_fcfs_still_refuses_what_fits_no_plan():
    # No all-host distance, 120 blocks: r0 fits only at the largest offload (2 device layers x 54
    # blocks), r1 does not fit beside it however placed, so it waits (and r3 behind it).
    p = make_policy("orbitflow", 4, cost_model=cost(), slo_s=1.0, admission="fcfs", solve_ahead=False,
                    windows=(16,), distances=(1, 4))
    admitted, _ = admit_in_order(p, QUEUE, cap(120))
    assert admitted == [("r0", 2)]
    assert p.admit(QUEUE[1], [replace(QUEUE[0], placement=tuple(tiers_for_distance(1, 4)))], cap(120)) is None


def test_a_request_owes_no_debt_for_its_own_prefill():
    """Prefill debt comes off the SLO of the requests that decode through it, not of the request
    prefilling: its own prompt runs before its first token (TTFT's business)."""
    c = OnlineCostModel(CostModel(4, compute_a_s=1e-3, compute_b_s_per_token=1e-6,
                                  compute_p_s_per_token=1e-6, link_bytes_per_s=1e6))
    decoding = view(0, 200)
    arriving = replace(view(1, 101), num_computed_tokens=0)  # 100 prompt tokens owed: 4 x 100 us
    inputs = batch_plan_inputs([decoding, arriving], cap(10_000), 4, c, SLO_S, (16,))
    assert [r.slo_s for r in inputs.requests] == [pytest.approx(SLO_S - 4e-4 / 16), SLO_S]


def test_the_arrivals_prefill_load_comes_off_every_slo():
    """At prefill load rho a request's mean gap is its decode step / (1 - rho): the SLO it is
    planned against is (its SLO less its share of the debt) x (1 - rho)."""
    c = OnlineCostModel(CostModel(4, compute_a_s=1e-3, compute_b_s_per_token=1e-6,
                                  compute_p_s_per_token=1e-6, link_bytes_per_s=1e6))
    decoding, arriving = view(0, 200), replace(view(1, 101), num_computed_tokens=0)
    inputs = batch_plan_inputs([decoding, arriving], cap(10_000), 4, c, SLO_S, (16,), prefill_load=0.25)
    assert [r.slo_s for r in inputs.requests] == [pytest.approx((SLO_S - 4e-4 / 16) * 0.75),
                                                  pytest.approx(SLO_S * 0.75)]
    with pytest.raises(ValueError, match="prefill_load must be >= 0"):
        batch_plan_inputs([decoding], cap(10_000), 4, c, SLO_S, (16,), prefill_load=-0.1)


@pytest.mark.parametrize("name", ["no-offload", "orbitflow"])
def test_slo_admission_leaves_room_for_the_prefills_of_arrivals_to_come(name):
    # Each 200-token prompt is 4 x 200 x 1 us = 0.8 ms of prefill; r0 (at 0 ms) and r1 (at 8 ms)
    # join as without arrivals (two requests step 5.6 ms against the 6 ms SLO). At 16 ms the
    # admissions' rate is 62.5/s: a prefill load of 0.05, so the decode steps must meet 5.7 ms.
    # The short r3 would step the batch at 5.8 ms: on time for the SLO alone, late once the
    # prefills that keep arriving share its steps. A policy that has seen no arrivals lets it join.
    c = OnlineCostModel(CostModel(4, compute_a_s=1e-3, compute_b_s_per_token=1e-6,
                                  compute_p_s_per_token=1e-6, link_bytes_per_s=1e6))

    def fresh():  # a 20 ms memory: the rate is taken over 10 ms or more
        return make_policy(name, 4, cost_model=c, slo_s=SLO_S, admission="slo", solve_ahead=False, windows=(16,),
                           arrival_memory_s=0.02)

    p = fresh()  # two tokens left each: the batch's lifetime peak is the next step's batch, about
    queue = [replace(QUEUE[0], arrival_time=0.0, max_tokens=2), replace(QUEUE[1], arrival_time=0.008, max_tokens=2)]
    short = replace(QUEUE[3], max_tokens=2)
    admitted, running = admit_in_order(p, queue, cap(10_000))
    assert [rid for rid, _ in admitted] == ["r0", "r1"]
    assert p.prefill_load() == pytest.approx(8e-4 / 0.01)  # the clock at r1's arrival; the span 10 ms
    p.observe(StepStats(0, 0.0056, ("r0", "r1"), 400, 2, 2, now=0.016))
    assert p.prefill_load() == pytest.approx(62.5 * 8e-4)
    assert p.admit(short, running, cap(10_000)) is None
    other = fresh()
    assert other.prefill_load() == 0.0 and other.admit(short, running, cap(10_000)) is not None
    p.request_finished("r0")  # a finished request's arrival still counts in the rate
    assert p.prefill_load() == pytest.approx(0.05)
    p.arrivals = ArrivalForecast(0.02)  # the same policy, its plan and history, without the arrivals
    assert p.prefill_load() == 0.0 and p.admit(short, running, cap(10_000)) is not None


# r0 alone: 4.8 ms a step; with a 400-token arrival, 6.4 ms: r0 (6 ms SLO) late, the arrival (1 s) not.
LONE = view(0, 200)
ARRIVAL = replace(view(1, 400), slo_s=1.0, num_computed_tokens=0)
WAIT_S = 16 * 4 * (1e-3 + 200e-6)  # until r0 (16 tokens left) finishes, at its step


@pytest.mark.parametrize("name", ["no-offload", "orbitflow"])
def test_slo_admission_weighs_the_ttft_that_waiting_costs(name):
    """One per-token miss (r0's) against the arrival's TTFT: refused while it can wait for r0 to
    finish, admitted once waiting would miss its TTFT SLO, refused again once that SLO is lost."""
    p = policy(name, None if name == "orbitflow" else "slo")
    can_wait = replace(ARRIVAL, ttft_slack_s=WAIT_S + 0.01)
    assert not ttft_at_stake(can_wait, [LONE], 4, p.cost, 1024)
    assert p.admit(can_wait, [LONE], cap(10_000)) is None
    lost = replace(ARRIVAL, ttft_slack_s=-0.01)
    assert not ttft_at_stake(lost, [LONE], 4, p.cost, 1024)
    assert p.admit(lost, [LONE], cap(10_000)) is None
    at_stake = replace(ARRIVAL, ttft_slack_s=WAIT_S - 0.01)
    assert ttft_at_stake(at_stake, [LONE], 4, p.cost, 1024)
    plan = p.admit(at_stake, [LONE], cap(10_000))  # the same batch: orbitflow's refusal cache re-decides
    assert plan is not None and plan.placements["r1"] == [Tier.DEVICE] * 4
    # Two misses (another 6 ms request in the batch) outweigh one TTFT.
    other = view(2, 10)
    assert p.admit(at_stake, [LONE, other], cap(10_000)) is None


def prefilling(i, prompt, slack):
    """A request with its whole `prompt` still to prefill (no token yet) and `slack` s of TTFT SLO left."""
    return RequestView(f"p{i}", prompt + 1, prompt + 1, 16, float(i), None, 0, 1.0, 0, None, 0, slack)


# 1 ms a prompt token per layer, L = 4: a 100-token prompt is 0.4 s of prefill, in 64-token chunks
# 0.256 s + 0.144 s (two steps).
PREFILL = OnlineCostModel(CostModel(4, compute_a_s=1e-3, compute_b_s_per_token=1e-6,
                                    compute_p_s_per_token=1e-3, link_bytes_per_s=1e6))


def test_prefills_sharing_steps_delay_each_others_first_token():
    """Two prompts prefilling together share every step: each one's first token waits for the
    other's chunks in its steps, as many as it has chunks (hand-computed)."""
    a, b = prefilling(0, 100, 1.0), prefilling(1, 200, 1.0)  # a: 2 chunks; b: 4 (3 x 64 + 8)
    assert shared_prefill_s(a, [b], 4, PREFILL, 64) == pytest.approx(2 * 0.256)
    assert shared_prefill_s(b, [a], 4, PREFILL, 64) == pytest.approx(0.256 + 0.144)
    assert shared_prefill_s(a, [view(2, 300)], 4, PREFILL, 64) == 0  # a decoding request owes none


def test_a_join_breaks_the_ttft_of_a_prompt_still_prefilling():
    """`ttft_delayed`: the running prompt (0.4 s of prefill) meets its TTFT alone with 0.5 s of slack
    but not with a 100-token joiner's chunks in its two steps (+0.4 s); with 0.9 s it still does, and
    with 0.3 s it is lost either way. A decoding request's TTFT is behind it."""
    joiner = prefilling(9, 100, 5.0)
    assert ttft_delayed(joiner, [prefilling(0, 100, 0.5)], 4, PREFILL, 64) == {"p0"}
    assert ttft_delayed(joiner, [prefilling(0, 100, 0.9)], 4, PREFILL, 64) == set()
    assert ttft_delayed(joiner, [prefilling(0, 100, 0.3)], 4, PREFILL, 64) == set()
    assert ttft_delayed(joiner, [view(1, 300)], 4, PREFILL, 64) == set()


def test_a_joiners_ttft_counts_the_prefills_it_shares_steps_with():
    """`ttft_at_stake` judges the joiner's TTFT with the running prompts' chunks in its steps: 0.45 s
    of slack covers its 0.4 s prefill alone but not waiting for the decoding request to finish
    too (16 steps of about 5 ms), so it is at stake; beside a 100-token prompt still prefilling its
    prefill is 0.8 s, which joining cannot save; with 0.85 s of slack it can again."""
    joiner = prefilling(9, 100, 0.45)
    assert ttft_at_stake(joiner, [view(1, 300)], 4, PREFILL, 64)
    assert not ttft_at_stake(joiner, [prefilling(0, 100, 5.0), view(1, 300)], 4, PREFILL, 64)
    assert ttft_at_stake(replace(joiner, ttft_slack_s=0.85), [prefilling(0, 100, 5.0), view(1, 300)], 4,
                         PREFILL, 64)


@pytest.mark.parametrize("name", ["no-offload", "orbitflow"])
def test_slo_admission_weighs_the_ttft_a_join_delays(name):
    """The arrival's chunks would push the prefilling p0's first token past its SLO and the
    arrival could wait (its TTFT is not at stake): refused; with p0's slack ample, admitted."""
    def admit(running_slack):  # a fresh policy each: orbitflow keeps refusing a batch it refused
        p = make_policy(name, 4, cost_model=PREFILL, slo_s=1.0, admission="slo", solve_ahead=False,
                        windows=(16,), prefill_chunk_tokens=64)
        return p.admit(prefilling(9, 100, 5.0), [prefilling(0, 100, running_slack)], cap(10_000))

    assert admit(0.5) is None
    assert admit(5.0) is not None


@pytest.mark.parametrize("name", ["no-offload", "orbitflow"])
def test_slo_admission_counts_no_miss_of_a_request_whose_ttft_is_missed(name):
    """r0 already missed its TTFT SLO: it cannot count toward goodput, so making it late costs no
    goodput miss; the tie is broken on everyone's late steps, so the arrival still waits (its own
    TTFT is not at stake) rather than slow the batch for nothing. `orbitflow-ties-join` (and the
    `slo` admission with `everyone_breaks_ties` False) lets it join, as before. An arrival that
    makes nobody late joins under both."""
    p = policy(name, None if name == "orbitflow" else "slo")
    assert p.admit(ARRIVAL, [replace(LONE, ttft_slack_s=0.5)], cap(10_000)) is None
    assert p.admit(ARRIVAL, [replace(LONE, ttft_slack_s=-0.5)], cap(10_000)) is None
    q = policy(name if name == "no-offload" else "orbitflow-ties-join", None if name == "orbitflow" else "slo")
    q.admission.everyone_breaks_ties = False
    assert q.admit(ARRIVAL, [replace(LONE, ttft_slack_s=-0.5)], cap(10_000)) is not None
    small = replace(ARRIVAL, num_tokens=10, num_prompt_tokens=10)  # 210 tokens in all: 4.84 ms, on time
    for r in (policy(name, None if name == "orbitflow" else "slo"), q):
        assert r.admit(small, [replace(LONE, ttft_slack_s=-0.5)], cap(10_000)) is not None


def test_orbitflow_pauses_a_request_whose_ttft_is_missed_when_it_makes_others_late():
    """r1 (TTFT missed) makes r0's step 6.4 ms, over its 6 ms SLO: the plan pauses r1 (a pause that
    costs no goodput) and r0 runs alone on time. With r1 able to meet its SLOs, one pause would
    cost as much as it saves, and nobody is paused."""
    p = policy("orbitflow", None)
    dev = tuple([Tier.DEVICE] * 4)
    r0, r1 = replace(LONE, placement=dev), replace(view(1, 400), slo_s=1.0, placement=dev, ttft_slack_s=-1.0)
    plan = p.replan([r0, r1], cap(10_000))
    assert plan.pause == ["r1"] and sorted(p.plan.distances) == ["r0"] and not p.plan.violations
    q = policy("orbitflow", None)
    plan = q.replan([r0, replace(r1, ttft_slack_s=1.0)], cap(10_000))
    assert plan.pause == [] and q.plan.violations == {"r0"}


def test_distance_like_offloads_at_least_as_many_layers():
    assert distance_like([Tier.DEVICE] * 8, 8) == 8
    assert distance_like([H] * 8, 8) == 0
    for fraction in (0.125, 0.25, 0.5, 0.75):
        tiers = uniform_placement(8, fraction)
        d = distance_like(tiers, 8)
        assert tiers_for_distance(d, 8).count(H) >= tiers.count(H)
        assert d == 7 or tiers_for_distance(d + 1, 8).count(H) < tiers.count(H)


def test_admission_names_and_config_validation():
    assert list(ADMISSIONS) == available_admissions() == ["fcfs", "slo"]
    with pytest.raises(ValueError, match="unknown admission 'lifo'"):
        make_admission("lifo")
    with pytest.raises(ValueError, match="admission must be one of"):
        EngineConfig(admission="lifo")
    with pytest.raises(ValueError, match="unknown admission"):
        make_policy("select-n", 4, admission="lifo")
    for name in ("no-offload", "orbitflow"):
        p = policy_from_config(EngineConfig(kv_policy=name, admission="fcfs", solve_ahead=False), 4, cost())
        assert p.admission.kind is AdmissionKind.FCFS


TRACE = [TraceRequest(f"q{i}", 0.05 * i, 600 + 200 * i, 40) for i in range(6)]


@pytest.mark.parametrize("admission", ADMISSIONS)
def test_every_policy_runs_with_each_admission_in_the_simulator(admission):
    # the policies the package registers (other test modules register test-only ones)
    builtin = available_policies(builtin_only=True)
    assert len(builtin) >= 9
    for name in builtin:
        # 512 MiB: 4K tokens of Llama-3.1-8B on device, below the trace's 6.6K; each prompt fits alone.
        r = simulate(SimConfig.build(model="llama-3.1-8b", gpu="a100-80gb", kv_policy=name, admission=admission,
                                     device_kv_bytes=512 << 20), TRACE)
        assert r.metrics["num_finished"] == len(TRACE), name
        assert r.policy_metrics["admission_admitted"] >= 1, name


def test_lifetime_peak_is_the_batch_at_its_largest_kv():
    # r0: 200 tokens, 100 left; r1: 100 tokens, 10 left. Step t holds 300 + 2t tokens while both
    # run (318 at t = 9, r1's last step), then r0 alone 200 + t (299 at t = 99): the peak is t = 9.
    r0 = RequestView("r0", 200, 200, 100, 0.0, None, deposit_tokens=5)
    r1 = RequestView("r1", 100, 100, 10, 1.0, None, num_computed_tokens=50)
    peak = lifetime_peak([r0, r1])
    assert [(v.request_id, v.num_tokens, v.max_new_tokens_left) for v in peak] == [("r0", 209, 91), ("r1", 109, 1)]
    assert [v.deposit_tokens for v in peak] == [0, 0] and [v.prefill_tokens_left for v in peak] == [0, 0]
    # With r1 at 10 tokens, r0 alone at t = 99 (299) beats the pair at t = 9 (209 + 19 = 228).
    assert [v.request_id for v in lifetime_peak([r0, replace(r1, num_tokens=10)])] == ["r0"]
    assert lifetime_peak([]) == []


def test_lifetime_admission_refuses_a_request_whose_growth_outgrows_the_device():
    # 400 device blocks. r0 (200 tokens, 100 left) and r1 (100 tokens, 100 left) fit all on device
    # for the 16-step window (4 x (54 + 29) = 332 blocks, step 5.2 ms), so the window judgement
    # admits r1. At their peak (t = 99: 299 + 199 tokens, 4 x 125 = 500 blocks) only an offload of
    # r1 fits, and any host layer of it (5 ms over the link) makes both late: lifetime refuses.
    r0 = RequestView("r0", 200, 200, 100, 0.0, tuple([Tier.DEVICE] * 4))
    r1 = RequestView("r1", 100, 100, 100, 1.0, None)
    window, lifetime = policy("orbitflow-window-admit", None), policy("orbitflow", None)
    assert window.admission_horizon == "window" and lifetime.admission_horizon == "lifetime"
    assert window.lifetime_misses([r0, r1], cap(400)) is None
    assert lifetime.lifetime_misses([r0], cap(400)) == 0
    assert lifetime.lifetime_misses([r0, r1], cap(400)) == 2
    # With `pause_cost` "slack" the peak pauses one, leaving the other on device and on time; that
    # pause waits from t = 51 (300 + 2t tokens > 400) to the finish at 100: 49 steps of 6 ms, far
    # past the 49 tokens' slack at the peak's 6.0 ms step, so it is a miss: 1.
    assert policy("orbitflow-pause-slack", None).lifetime_misses([r0, r1], cap(400)) == 1
    assert window.admit(r1, [r0], cap(400)).placements["r1"] == [Tier.DEVICE] * 4
    assert lifetime.admit(r1, [r0], cap(400)) is None
    # The reverse: r1 with 10 tokens left peaks with r0 at 318 tokens (4 x 81 = 324 blocks, 5.3 ms),
    # on device and on time for life: it joins under both.
    short = replace(r1, max_tokens=10)
    assert lifetime.lifetime_misses([r0, short], cap(400)) == 0
    for p in (window, policy("orbitflow", None)):
        assert p.admit(short, [r0], cap(400)).placements["r1"] == [Tier.DEVICE] * 4


def test_lifetime_tie_is_broken_on_everyones_late_steps():
    # The batch above, r0's TTFT SLO missed already; r1 (1 s SLO) on time itself. At the peak r0 is
    # late (no goodput miss either way: a tie), so the tie is broken on everyone's late steps (1
    # against 0) and r1 waits; the ablation lets it join. With 10 tokens left r0 stays on time: it joins.
    r0 = RequestView("r0", 200, 200, 100, 0.0, tuple([Tier.DEVICE] * 4), ttft_slack_s=-1.0)
    r1 = RequestView("r1", 100, 100, 100, 1.0, None, slo_s=1.0)
    p, q = policy("orbitflow", None), policy("orbitflow-ties-join", None)
    assert p.lifetime_misses([r0, r1], cap(400)) == 0
    assert p.lifetime_misses([r0, r1], cap(400), everyone=True) == 1
    assert p.admission.everyone_breaks_ties and not q.admission.everyone_breaks_ties
    assert p.admit(r1, [r0], cap(400)) is None
    assert q.admit(r1, [r0], cap(400)).placements["r1"] == [Tier.DEVICE] * 4
    short = replace(r1, max_tokens=10)
    for r in (policy("orbitflow", None), q):
        assert r.admit(short, [r0], cap(400)).placements["r1"] == [Tier.DEVICE] * 4


@pytest.mark.parametrize("name", ["orbitflow", "no-offload"])
def test_a_request_whose_ttft_is_lost_joins_a_tie_without_the_tie_break_when_the_batch_fits_for_life(name):
    """A joiner that has lost its TTFT SLO (`ttft_lost`) is offered only once no request that can
    still meet its TTFT waits (`steps_aside`). When the batch with it fits on device whole until
    it finishes (`fits_device_for_life`), the join adds compute only: a tie joins, though it makes
    steps late for those already late (both TTFT SLOs missed; 600 tokens: 6.4 ms a step against
    6 ms). When the batch would outgrow the device (400 blocks: 800 blocks at its peak), the
    tie-break still holds it back; and the same join with r1 able is refused by the goodput rule."""
    r0 = RequestView("r0", 200, 200, 100, 0.0, tuple([Tier.DEVICE] * 4), ttft_slack_s=-1.0)
    lost = RequestView("r1", 400, 400, 100, 1.0, None, ttft_slack_s=-1.0)
    assert fits_device_for_life([r0, lost], cap(10_000)) and not fits_device_for_life([r0, lost], cap(400))
    assert policy(name, "slo").admit(lost, [r0], cap(10_000)).placements["r1"] == [Tier.DEVICE] * 4
    assert policy(name, "slo").admit(lost, [r0], cap(400)) is None
    able = replace(lost, ttft_slack_s=100.0)
    assert policy(name, "slo").admit(able, [r0], cap(10_000)) is None


def test_admission_horizon_is_validated():
    with pytest.raises(ValueError, match="admission_horizon must be one of"):
        make_policy("orbitflow", 4, solve_ahead=False, admission_horizon="forever")
    assert make_policy("orbitflow", 4, solve_ahead=False, admission_horizon="window").admission_horizon == "window"


@pytest.mark.parametrize("name", ["orbitflow", "no-offload"])
def test_slo_admission_lets_a_request_whose_ttft_is_lost_step_aside(name):
    """`slo`: a queued request whose TTFT slack is below its own prefill (here: negative) lets those
    behind it go first; one that can still meet its TTFT, or has no TTFT SLO, does not; `fcfs` and
    the `orbitflow-fifo-queue` ablation keep arrival order. (The scheduler's side: test_scheduler.py.)"""
    lost, able, unjudged = (replace(view(0, 200), ttft_slack_s=s) for s in (-0.5, 10.0, None))
    p = policy(name, "slo")
    assert [p.admission.steps_aside(p, v) for v in (lost, able, unjudged)] == [True, False, False]
    for q in (policy(name, "fcfs"), policy("orbitflow-fifo-queue", None)):
        assert not q.admission.steps_aside(q, lost)
