"""The OrbitFlow policy at run time, without a model: Pause-Resume through the real scheduler,
refinement triggers, solving ahead, solver-failure fallback, all-host placement, the bank target
Token-Deposit gets from the plan, and the online cost-model fit; and (slow) all-host through the engine."""

import math
import random
from dataclasses import replace

import pytest

from orbitflow_ray.costmodel import CostModel, OnlineCostModel, StepSample
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.llm import LLM
from orbitflow_ray.planner import StepStats, make_policy
from orbitflow_ray.planner.ahead import AheadSolver
from orbitflow_ray.planner.base import CapacityView, RequestView
from orbitflow_ray.planner.deposit import bank_target
from orbitflow_ray.planner.pause import pause_strategy
from orbitflow_ray.planner.problem import PlanInputs, PlanRequest, PlanStatus, engine_step_time, step_time
from orbitflow_ray.request import RequestStatus
from orbitflow_ray.sampling_params import SamplingParams
from test_scheduler import LAYERS, drive, make, req


def overloaded(policy, n=5, max_tokens=150, **kw):
    """Five long generations whose KV outgrows a 100-block device pool within a 32-step window."""
    s = make(policy, device_blocks=100, host_blocks=1000, max_num_batched_tokens=64,
             prefill_chunk_size=32, **kw)
    reqs = [req(i, 20 + 4 * i, max_tokens) for i in range(n)]
    for r in reqs:
        s.add_request(r)
    return s, reqs


def test_pause_resume_under_overload_loses_nothing():
    # The window-horizon admission lets this batch in and it outgrows the device: Pause-Resume
    # keeps it running (`orbitflow`'s lifetime horizon would not have admitted it all).
    s, reqs = overloaded("orbitflow-window-admit")
    checked = 0
    for _ in range(5000):
        if not s.has_unfinished():
            break
        before = {r.request_id: r.num_tokens for r in s.running}
        out = s.schedule()
        for r in s.swapped:  # largest first: a request paused this step had the most tokens
            if r.status == RequestStatus.PAUSED and r.request_id in before:
                assert before[r.request_id] == max(before.values())
                checked += 1
        for t in Tier:
            assert s.kv.used_bytes(t) == s.kv.held_bytes(t) <= s.kv.capacity_bytes(t)
        s.update_from_output(out, {q.request_id: 7 for q in out.seqs if q.sample}, 0.0)
    assert not s.has_unfinished()
    assert all(len(r.output_token_ids) == 150 for r in reqs)
    assert s.num_pauses > 0 and s.num_preemptions == 0  # the policy paused; nothing was swapped blindly
    m = s.policy.metrics()
    assert m["pauses"] == s.num_pauses and m["resumes"] >= s.num_pauses
    assert checked >= 1
    assert s.kv.used_bytes(Tier.DEVICE) == s.kv.used_bytes(Tier.HOST) == 0


def test_no_pause_ablation_falls_back_and_still_finishes():
    s, reqs = overloaded("orbitflow-no-pause")
    drive(s)
    assert s.num_pauses == 0
    assert s.policy.metrics()["fallbacks"] > 0
    assert all(len(r.output_token_ids) == 150 for r in reqs)


@pytest.mark.parametrize("policy", ["orbitflow", "orbitflow-uniform", "orbitflow-no-deposit"])
def test_plans_never_exceed_capacity(policy):
    s, reqs = overloaded(policy)
    drive(s)  # drive() asserts used <= capacity on both tiers after every step
    assert all(len(r.output_token_ids) == 150 for r in reqs)


def test_overdue_pause_is_resumed_and_protected():
    # max_pause_s tiny: a paused request is overdue at once, so it is pinned on resume and others
    # are paused in its place; everyone still finishes. (Window-horizon admission: the lifetime
    # one would not let in the batch that outgrows the device.)
    s, reqs = overloaded("orbitflow-window-admit", max_pause_s=1e-9)
    drive(s)
    assert all(len(r.output_token_ids) == 150 for r in reqs)
    assert s.policy.metrics()["resumes"] >= 1


def test_refinement_triggers():
    s, reqs = overloaded("orbitflow", n=2, max_tokens=80)
    drive(s)
    m = s.policy.metrics()
    assert m["trigger_window"] >= 1  # 80 tokens outlast a 32-step window
    assert m["plans"] >= 2


def _views(n, tokens=40, placement=None):
    return [RequestView(f"r{i}", tokens, tokens - 1, 100, float(i), placement, 1) for i in range(n)]


def _cap(device_blocks=1000, bs=4):
    return CapacityView(LAYERS, bs, 100, device_blocks, device_blocks, 1000, 1000)


@pytest.mark.parametrize("policy", ["orbitflow", "orbitflow-uniform"])
def test_ample_device_memory_offloads_nothing(policy):
    """With room for everything on device, every request stays there: on this link (the CPU
    prior) offloading would cost no predicted stall, and a tie on T goes to moving nothing."""
    p = make_policy(policy, LAYERS, solve_ahead=False)
    running = _views(3)
    for i, v in enumerate(running):
        plan = p.admit(v, running[:i], _cap())
        assert plan is not None and not plan.pause
        assert all(tiers == [Tier.DEVICE] * LAYERS for tiers in plan.placements.values())
    assert set(p.plan.distances.values()) == {LAYERS} and not any(p.plan.host_layers.values())


def test_drift_marks_the_plan_stale_and_replans():
    p = make_policy("orbitflow", LAYERS, solve_ahead=False, drift_patience=2)
    running = _views(2)
    p.admit(running[0], [], _cap())
    p.admit(running[1], running[:1], _cap())
    running = _views(2, placement=tuple([Tier.DEVICE] * LAYERS))
    p.replan(running, _cap())
    assert p.metrics()["trigger_drift"] == 0
    pred = p.triggers.predicted_s
    for step in range(2):  # twice as slow as predicted, twice in a row
        p.observe(StepStats(step, 2 * pred, ("r0", "r1"), 80, 2, 2))
    p.replan(running, _cap())
    assert p.metrics()["trigger_drift"] == 1


def test_the_plan_sets_the_deposit_bank_target():
    """Token-Deposit banks only what covers the stalls the plan predicts: nothing when the step
    meets every SLO, the stall of a prefill the batch still owes, a slow window's lag."""
    p = make_policy("orbitflow", LAYERS, solve_ahead=False)
    running = [replace(v, slo_s=10.0) for v in _views(2)]
    p.admit(running[0], [], _cap())
    p.admit(running[1], running[:1], _cap())
    running = [replace(v, placement=tuple([Tier.DEVICE] * LAYERS)) for v in running]
    p.replan(running, _cap())
    assert p.deposit_target("r0") == p.deposit_target("r1") == 0 and p.deposit_target("gone") == 0
    T, W = p.triggers.predicted_s, min(p.plan.window, running[0].max_new_tokens_left)
    loose = [replace(v, slo_s=2 * T) for v in running]
    owing = [loose[0], replace(loose[1], num_tokens=2000, num_computed_tokens=40)]  # r1: a long prompt
    p.replan(owing, _cap())
    debt = p._prefill_debt_s(owing)
    assert debt > 2 * T and p.deposit_target("r0") == bank_target(p.triggers.predicted_s, 2 * T, W, [debt], 0.9) > 0
    p.replan([replace(v, slo_s=T / 2) for v in running], _cap())  # every step twice the SLO
    assert p.deposit_target("r0") == bank_target(p.triggers.predicted_s, T / 2, W) > 0
    # r0 and r1 admitted at 0 s and 1 s: one arrival a second. The forecast looks over the longest
    # plan window (128 steps), not the plan's own (2 steps here, which would expect none): each
    # expected prefill would make a token late, the step just meeting the SLO
    busy = [replace(v, slo_s=T) for v in running]
    p.observe(StepStats(9, T, ("r0", "r1"), 80, 2, 2, now=1.0))
    p.plan.window = 2
    p.replan(busy, _cap())
    T1 = p.triggers.predicted_s
    expected = math.floor(1.0 * 128 * T1 + 0.5)
    assert expected >= 1 and math.floor(1.0 * 2 * T1 + 0.5) == 0
    prefill = LAYERS * p.cost.model.compute_p_s_per_token * busy[0].num_prompt_tokens
    expect = bank_target(T1, T, 2, [0.0] + [prefill] * expected, 0.9)
    assert p.deposit_target("r0") == expect > 0
    ablation = make_policy("orbitflow-no-deposit", LAYERS, solve_ahead=False)
    ablation.admit(running[0], [], _cap())
    ablation.replan([replace(running[0], slo_s=T / 2)], _cap())
    assert ablation.deposit_target("r0") == 0


def test_solver_failure_falls_back_without_dropping():
    p = make_policy("orbitflow", LAYERS, solve_ahead=False)

    class Broken:
        stats: dict = {}

        def solve(self, inputs):
            raise RuntimeError("solver exploded")

    p.solver = Broken()
    plan = p.admit(_views(1)[0], [], _cap())
    assert plan is not None and "r0" in plan.placements  # the heuristic placement, not a refusal
    assert plan.placements["r0"].count(Tier.HOST) == LAYERS // 2
    assert p.metrics()["fallbacks"] == 1
    assert p.plan.status is PlanStatus.FALLBACK_ERROR and p.plan.status.is_fallback
    assert p.plan_solver() == "fallback-error"  # the label metrics and dashboards show


def test_no_room_and_no_pause_gives_the_infeasible_fallback():
    """Three requests whose KV cannot fit 4 device blocks even at the largest offload, under a
    policy that may not pause: the plan is the largest-offload fallback, typed as such."""
    p = make_policy("orbitflow-no-pause", LAYERS, solve_ahead=False, distances=(1, 2, LAYERS))  # no all-host
    plan, paused = p.solve_loop.solve(_views(3), _cap(device_blocks=4), frozenset())
    assert plan.status is PlanStatus.FALLBACK_INFEASIBLE and plan.status.is_fallback and not paused
    assert plan.solver == "fallback-infeasible" and set(plan.distances) == {"r0", "r1", "r2"}
    assert not PlanStatus.FEASIBLE.is_fallback and not PlanStatus.INFEASIBLE.is_fallback


# ---- all-host (d = 0) ---------------------------------------------------------------------------
SMOL_LAYERS, SMOL_BLOCK = 30, 16 * 1536  # SmolLM2-135M: 30 layers, 1,536 B of KV per token and layer
DEVICE_48MIB = (48 << 20) // SMOL_BLOCK  # deployments/config.yaml: about 1,090 tokens x 30 layers


def test_request_too_big_for_any_partial_offload_streams_all_host():
    """2,500 tokens keep 15 layers x 157 blocks on device at d = 1, more than 48 MiB: the request
    is admitted all-host (it used to be refused), and a short one beside it stays on device."""
    cap = CapacityView(SMOL_LAYERS, 16, SMOL_BLOCK, DEVICE_48MIB, DEVICE_48MIB, 40_000, 40_000)
    p = make_policy("orbitflow", SMOL_LAYERS, solve_ahead=False)
    big = RequestView("big", 2500, 2500, 8, 0.0, None)
    small = RequestView("small", 300, 300, 8, 1.0, None)
    assert 15 * -(-2508 // 16) > DEVICE_48MIB
    assert p.place_new(big, cap) == [Tier.HOST] * SMOL_LAYERS  # what check_fits holds it against
    assert p.place_new(small, cap).count(Tier.HOST) == SMOL_LAYERS // 2  # as before: d = 1
    plan = p.admit(big, [], cap)
    assert plan.placements == {"big": [Tier.HOST] * SMOL_LAYERS} and p.plan.distances == {"big": 0}
    running = [replace(big, placement=tuple(plan.placements["big"]))]
    plan = p.admit(small, running, cap)
    assert plan is not None and p.plan.distances == {"big": 0, "small": SMOL_LAYERS}


@pytest.mark.slow
def test_engine_serves_what_only_all_host_holds():
    """Through the engine with the default config's 48 MiB device tier: a 2,500-token prompt runs
    all-host beside a short one that does not, and greedy output is token-identical to no offload."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    llm = LLM(model="smollm2-135m", kv_policy="orbitflow", device_kv_bytes=48 << 20,
              tpot_slo_s=10.0)  # loose: only capacity binds, so the short one joins at once
    tok = llm.engine.tokenizer
    text = ("The history of the printing press begins in the fifteenth century, when movable type "
            "changed how knowledge spread across Europe. ")
    prompts = [tok.encode(text * 200, add_special_tokens=False)[:2500],
               tok.encode("Hello, my name is", add_special_tokens=False)]
    assert len(prompts[0]) == 2500
    policy, plans = llm.engine.policy, []
    install = policy._install
    policy._install = lambda plan, *args: plans.append(dict(plan.distances)) or install(plan, *args)
    outs = llm.generate(prompts, params)
    stats = llm.kv_stats()
    llm.engine.close()
    ref = LLM(model="smollm2-135m", kv_policy="no-offload", device_kv_bytes=256 << 20)
    base = ref.generate(prompts, params)
    ref.engine.close()
    assert [o.token_ids for o in outs] == [o.token_ids for o in base]
    big, small = (o.request_id for o in outs)
    assert any(big in p for p in plans) and all(p[big] == 0 for p in plans if big in p)
    assert any(small in p for p in plans if big in p) and all(p[small] != 0 for p in plans if small in p)
    assert stats["bytes_h2d"] > 0 and stats["num_preemptions"] == stats["num_pauses"] == 0


def test_ahead_solver_only_hands_over_the_matching_state():
    calls = []
    ahead = AheadSolver(lambda x: calls.append(x) or x * 2, background=True)
    ahead.submit(("a", 1), 21)
    ahead._pending[1].result()
    assert ahead.take(("b", 1)) is None  # solved for another batch: never used
    assert ahead.take(("a", 1)) == 42
    assert ahead.take(("a", 1)) is None  # handed over once
    assert ahead.solve_now(5) == 10
    st_ = ahead.stats
    assert st_["solves_ahead"] == 1 and st_["solves_ahead_used"] == 1 and st_["solves_sync"] == 1
    ahead.close()


def test_pause_strategies():
    views = [RequestView("a", 10, 5, 9, 0.0, None), RequestView("b", 50, 5, 9, 1.0, None),
             RequestView("c", 30, 5, 9, 2.0, None)]
    rng = random.Random(0)
    assert pause_strategy("largest")(views, rng) == "b"
    assert pause_strategy("shortest")(views, rng) == "a"
    assert pause_strategy("random")(views, rng) in {"a", "b", "c"}
    with pytest.raises(ValueError, match="pause_strategy"):
        pause_strategy("biggest")


# ---- cost model -------------------------------------------------------------------------------
def test_online_fit_recovers_the_cost_model():
    truth = CostModel(4, compute_a_s=2e-3, compute_b_s_per_token=5e-7, compute_p_s_per_token=3e-5,
                      link_bytes_per_s=1e9)
    online = OnlineCostModel(CostModel(4, 1e-3, 0.0, 0.0, 10e9), window=32, min_samples=8)
    rng = random.Random(1)
    for _ in range(32):
        ctx, new = rng.randint(100, 20_000), rng.randint(1, 300)
        online.observe(StepSample(truth.compute_step_s(ctx, new), ctx, new))
        nbytes = rng.randint(1 << 20, 1 << 24)
        online.observe(StepSample(truth.compute_step_s(ctx, new) + 0.01, ctx, new, nbytes,
                                  truth.transfer_s(nbytes)))
    m = online.model
    assert m.compute_a_s == pytest.approx(2e-3, rel=1e-3)
    assert m.compute_b_s_per_token == pytest.approx(5e-7, rel=1e-3)
    assert m.compute_p_s_per_token == pytest.approx(3e-5, rel=1e-3)
    assert m.link_bytes_per_s == pytest.approx(1e9, rel=1e-6)
    assert online.num_fits > 0


def test_online_fit_keeps_only_the_last_window_of_samples():
    # The machine changes speed: once `window` samples of the new speed have arrived, the fit is the
    # new speed exactly (the old samples rolled out, oldest first).
    slow = CostModel(4, compute_a_s=4e-3, compute_b_s_per_token=1e-6, compute_p_s_per_token=6e-5, link_bytes_per_s=1e9)
    fast = CostModel(4, compute_a_s=1e-3, compute_b_s_per_token=2e-7, compute_p_s_per_token=1e-5, link_bytes_per_s=1e9)
    online = OnlineCostModel(CostModel(4, 1e-3, 0.0, 0.0, 10e9), window=16, min_samples=8)
    rng = random.Random(2)
    for truth, n in ((slow, 40), (fast, 15), (fast, 1)):
        for _ in range(n):
            ctx, new = rng.randint(100, 20_000), rng.randint(1, 300)
            online.observe(StepSample(truth.compute_step_s(ctx, new), ctx, new))
        if n == 15:  # one slow sample is still in the window: the fit is not yet the fast model
            assert online.model.compute_a_s != pytest.approx(1e-3, rel=1e-3)
    m = online.model
    assert (m.compute_a_s, m.compute_b_s_per_token, m.compute_p_s_per_token) == pytest.approx((1e-3, 2e-7, 1e-5), rel=1e-6)


def test_online_fit_learns_what_copies_cost_in_compute_and_keeps_it_through_steps_on_device():
    # The CPU backend: each copied byte costs 2 ns of compute; the prior says 0.1 ns (a prior that
    # prices copies: the per-byte cost is fitted). Steps on device and offloaded steps (stall
    # measured, 0 here) interleave: the fit recovers (a, b, p) and the per-byte cost. Then a
    # window's worth of steps on device copies nothing: the per-byte cost is kept, not forgotten,
    # and (a, b, p) stay exact with it taken off.
    truth = CostModel(4, compute_a_s=2e-3, compute_b_s_per_token=5e-7, compute_p_s_per_token=3e-5,
                      link_bytes_per_s=1e9, copy_compute_s_per_byte=2e-9)
    prior = CostModel(4, 1e-3, 0.0, 0.0, 10e9, copy_compute_s_per_byte=1e-10)
    online = OnlineCostModel(prior, window=32, min_samples=8)
    assert online.fits_copy_compute and not OnlineCostModel(replace(prior, copy_compute_s_per_byte=0.0)).fits_copy_compute
    rng = random.Random(3)
    for _ in range(32):
        ctx, new = rng.randint(100, 20_000), rng.randint(1, 300)
        online.observe(StepSample(truth.compute_step_s(ctx, new), ctx, new, stall_s=0.0))
        h2d, d2h = rng.randint(1 << 20, 1 << 24), rng.randint(0, 1 << 16)
        wall = truth.compute_step_s(ctx, new) + (h2d + d2h) * truth.copy_compute_s_per_byte
        online.observe(StepSample(wall, ctx, new, h2d, truth.transfer_s(h2d), 0.0, d2h))
    m = online.model
    assert m.copy_compute_s_per_byte == pytest.approx(2e-9, rel=1e-6)
    assert (m.compute_a_s, m.compute_b_s_per_token, m.compute_p_s_per_token) == pytest.approx((2e-3, 5e-7, 3e-5), rel=1e-6)
    for _ in range(32):
        ctx, new = rng.randint(100, 20_000), rng.randint(1, 300)
        online.observe(StepSample(truth.compute_step_s(ctx, new), ctx, new, stall_s=0.0))
    assert online.model.copy_compute_s_per_byte == pytest.approx(2e-9, rel=1e-6)  # kept: the window holds no copy now
    assert (online.model.compute_a_s, online.model.compute_b_s_per_token) == pytest.approx((2e-3, 5e-7), rel=1e-6)


def test_online_fit_keeps_the_prior_where_the_window_cannot_tell_coefficients_apart():
    # One request decoding alone: every step computes one new token (a and p cannot be told apart:
    # only a + p is learnt) over a context that moves by 1 token a step from 880 (b cannot be told
    # from a at that range), with noise; nothing is copied yet. The prior is the truth's, the
    # machine 1.5x slower than it: the fit must learn the step (a + p + b * ctx within 2 %) and price
    # the step it has not seen, two requests at twice the context with copies, at 1.5x the prior's
    # compute within 5 % (the slowdown applied to every term), the copies at the prior's rate (the
    # window copied nothing).
    L = 30
    prior = CostModel(L, compute_a_s=1.3e-3, compute_b_s_per_token=3.6e-7, compute_p_s_per_token=3e-4,
                      link_bytes_per_s=8e9, copy_compute_s_per_byte=5e-10)
    online = OnlineCostModel(prior)
    rng = random.Random(4)
    for i in range(40):
        ctx = 880 + i
        online.observe(StepSample(1.5 * prior.compute_step_s(ctx, 1) * rng.uniform(0.9, 1.1), ctx, 1))
    m = online.model
    assert m.compute_step_s(900, 1) == pytest.approx(1.5 * prior.compute_step_s(900, 1), rel=0.02)
    assert m.compute_step_s(1800, 2) == pytest.approx(1.5 * prior.compute_step_s(1800, 2), rel=0.05)
    assert m.copy_compute_s_per_byte == prior.copy_compute_s_per_byte
    # The nnls fit this replaced (no prior) fails both: 0.97x the step seen, 0.92x the unseen one (p
    # set to 0). The unseen step must differ from the seen one enough for the test to tell:
    assert prior.compute_step_s(1800, 2) / prior.compute_step_s(900, 1) > 1.2


def test_cost_model_validates():
    with pytest.raises(ValueError):
        CostModel(0, 1e-3, 0, 0, 1e9)
    with pytest.raises(ValueError):
        OnlineCostModel(CostModel(2, 1e-3, 0, 0, 1e9), window=4, min_samples=8)


def test_engine_step_time_issues_the_union_of_host_layers_in_order():
    # L = 8, 1 s of compute per layer, 1 byte/s, one byte per token. a (6 tokens) at d = 7 offloads
    # layer 7; b (1 token) at d = 1 offloads 1, 3, 5, 7. The EDF model sends a's 6 bytes from the
    # top of the step: 10 bytes land by 10 s, layer 7 computes to 11 s. The engine (depth 1) issues
    # layer 7's copy (7 bytes, a's and b's) only when layer 4 starts (4 s), behind the write-backs of
    # layers 1 and 3 (link free at 5 s): it lands at 12 s, layer 7 computes to 13 s.
    reqs = (PlanRequest("a", 6, 10, 20.0), PlanRequest("b", 1, 10, 20.0))
    inputs = PlanInputs(reqs, 8, 1, 1000, 1.0, 1.0, 0.0)
    assert step_time(inputs, [7, 1]) == pytest.approx(11.0)
    assert engine_step_time(inputs, [7, 1], 1) == pytest.approx(13.0)
    # One distance for both: one copy at the top of the step, both models give 7 + 1 s.
    assert step_time(inputs, [7, 7]) == engine_step_time(inputs, [7, 7], 1) == pytest.approx(8.0)
    # A 2 s tail (LM head) of the 8 s of compute runs after the last layer: layers take 0.75 s, the
    # copy still lands at 7 s, layer 7 ends at 7.75 s, the tail at 9.75 s; no copy overlaps it.
    tailed = replace(inputs, step_tail_s=2.0)
    assert engine_step_time(tailed, [7, 7], 1) == pytest.approx(9.75)
    assert engine_step_time(tailed, [8, 8], 1) == pytest.approx(8.0)  # all on device: compute alone


def test_a_mixed_plan_the_engine_runs_slower_gives_way_to_the_best_single_distance():
    """`engine_checked` weighs a plan mixing distances against the best single-distance plan, both
    as the engine runs them, even when neither is late: the batch of the test above, where [7, 1]
    takes 11 s in the EDF model and 13 s on the engine; both fit on device whole (8 s, no bytes)."""
    from orbitflow_ray.planner.problem import make_plan
    reqs = (PlanRequest("a", 6, 10, 20.0), PlanRequest("b", 1, 10, 20.0))
    inputs = PlanInputs(reqs, 8, 1, 1000, 1.0, 1.0, 0.0, windows=(16,))
    loop = make_policy("orbitflow", 8, solve_ahead=False, windows=(16,)).solve_loop
    mixed = make_plan(inputs, [7, 1], step_time(inputs, [7, 1]), 16, PlanStatus.FEASIBLE, 0.0, "fast")
    assert not mixed.violations and mixed.predicted_step_s == pytest.approx(11.0)
    checked = loop.engine_checked(mixed, inputs)
    assert checked.distances == {"a": 8, "b": 8} and checked.predicted_step_s == pytest.approx(8.0)
    assert loop.counters["engine_single"] == 1 and loop.counters["engine_slower"] == 0
    # one distance for the batch: judged as the engine runs it, never swapped
    one = make_plan(inputs, [7, 7], step_time(inputs, [7, 7]), 16, PlanStatus.FEASIBLE, 0.0, "fast")
    assert loop.engine_checked(one, inputs).distances == {"a": 7, "b": 7}
    # the EDF ablation takes the solver's plan as it is
    edf = make_policy("orbitflow-edf-link", 8, solve_ahead=False, windows=(16,)).solve_loop
    assert edf.engine_checked(mixed, inputs) is mixed


def test_engine_step_time_adds_what_the_copies_cost_in_compute():
    # L = 8, blocks of 4 tokens, 2 bytes a token and layer. a (10 tokens: 3 blocks) at d = 1 keeps
    # layers 1, 3, 5, 7 on host: 4 x 12 tokens x 2 bytes copied in, 4 x 4 x 2 written back = 128 bytes.
    reqs = (PlanRequest("a", 10, 10, 20.0),)
    inputs = PlanInputs(reqs, 8, 2, 1000, 1e9, 1e-3, 0.0, block_size=4)
    base = engine_step_time(inputs, [1], 1)
    priced = replace(inputs, copy_compute_s_per_byte=1e-6)
    assert engine_step_time(priced, [1], 1) == pytest.approx(base + 128e-6)
    assert engine_step_time(priced, [8], 1) == engine_step_time(inputs, [8], 1)  # all on device: no copies
    with pytest.raises(ValueError, match="copy_compute_s_per_byte"):
        replace(inputs, copy_compute_s_per_byte=-1.0)


def test_orbitflow_judges_plans_at_the_engine_step_and_its_ablation_at_the_edf_one():
    from orbitflow_ray.planner.admission import batch_plan_inputs
    cost = OnlineCostModel(CostModel(8, compute_a_s=1e-3, compute_b_s_per_token=1e-7,
                                     compute_p_s_per_token=0.0, link_bytes_per_s=2e6))
    cap = CapacityView(8, 4, 100, 700, 700, 10_000, 10_000)
    views = [RequestView(f"r{i}", n, n, 64, float(i), None) for i, n in enumerate((600, 300, 100))]
    for name in ("orbitflow", "orbitflow-edf-link"):
        p = make_policy(name, 8, cost_model=cost, slo_s=0.05, solve_ahead=False, windows=(16,))
        p.replan(views, cap)
        kept = [v for v in views if v.request_id in p.plan.distances]  # those not paused
        inputs = batch_plan_inputs(kept, cap, 8, cost, 0.05, (16,), deposit=True)
        ds = [p.plan.distances[v.request_id] for v in kept]
        judged = engine_step_time(inputs, ds, 1) if name == "orbitflow" else step_time(inputs, ds)
        assert p.plan.predicted_step_s == pytest.approx(judged)
    with pytest.raises(ValueError, match="link_model must be one of"):
        make_policy("orbitflow", 8, solve_ahead=False, link_model="fifo")
    with pytest.raises(ValueError, match="prefetch_depth must be an integer"):
        make_policy("orbitflow", 8, solve_ahead=False, prefetch_depth=0)


def _held_case(policy, link_bytes_per_s, device_blocks=10_000, distances=(4, 8), window=16):
    """Two 600-token requests in force at `distances` (8 layers; 25 B per token per layer), their
    window run out: the next `replan` is a window trigger. Compute alone is ~8 ms a step (SLO 50 ms)."""
    import time
    from orbitflow_ray.planner.orbitflow import tiers_for_distance
    from orbitflow_ray.planner.problem import make_plan
    cost = OnlineCostModel(CostModel(8, compute_a_s=1e-3, compute_b_s_per_token=1e-7,
                                     compute_p_s_per_token=0.0, link_bytes_per_s=link_bytes_per_s))
    p = make_policy(policy, 8, cost_model=cost, slo_s=0.05, solve_ahead=False, windows=(window,))
    cap = CapacityView(8, 4, 100, device_blocks, device_blocks, 100_000, 100_000)
    views = [RequestView(f"r{i}", 600, 599, 2000, float(i), tuple(tiers_for_distance(d, 8)), 1)
             for i, d in enumerate(distances)]
    inputs = p.solve_loop.inputs(views, cap)
    p.plan = make_plan(inputs, list(distances), step_time(inputs, list(distances)), window, PlanStatus.OPTIMAL,
                       time.perf_counter(), "fast")
    p.plan_ids, p.triggers.steps_left = frozenset(p.plan.distances), 0
    return p, views, cap


def test_window_end_keeps_a_placement_on_time_and_the_ablation_moves_kv():
    # A fast link: r0's 4 host layers stall nothing, so its plan is on time; the solver would
    # bring them back (no offload ties on T and moves fewer link bytes), which copies KV in a step
    # that then runs late for the whole batch. orbitflow keeps the placement; its ablation moves.
    p, views, cap = _held_case("orbitflow", 1e12)
    out = p.replan(views, cap)
    assert (out is None or not out.placements) and p.plan.distances == {"r0": 4, "r1": 8}
    assert p.metrics()["plans_held"] == 1 and p.metrics()["trigger_window"] == 1
    p, views, cap = _held_case("orbitflow-no-hold", 1e12)
    out = p.replan(views, cap)
    assert out.placements == {"r0": [Tier.DEVICE] * 8} and p.plan.distances == {"r0": 8, "r1": 8}
    assert p.metrics()["plans_held"] == 0
    with pytest.raises(ValueError, match="placement_hold must be a bool"):
        make_policy("orbitflow", 8, solve_ahead=False, placement_hold="yes")


def test_a_finish_re_places_even_a_placement_on_time():
    # As above, but the re-plan is a batch change: r2 finished mid-window. The two left are on
    # time where they are, yet the finish freed room: orbitflow re-solves (as its ablation does)
    # and brings r0's host layers back, where at a window's end it held them (test above).
    for policy in ("orbitflow", "orbitflow-no-hold"):
        p, views, cap = _held_case(policy, 1e12, distances=(4, 8, 8))
        p.triggers.steps_left = 8
        p.request_finished("r2")
        out = p.replan(views[:2], cap)
        assert p.metrics()["trigger_batch"] == 1 and p.metrics()["trigger_window"] == 0
        assert p.metrics()["plans_held"] == 0 and p.plan.distances == {"r0": 8, "r1": 8}
        assert out.placements == {"r0": [Tier.DEVICE] * 8}


def test_window_end_re_places_a_placement_that_runs_late():
    # A slow link: r0's host layers (4 x 600 tokens x 25 B = 60 kB at 100 kB/s) stall 0.6 s, far
    # over the 50 ms SLO; all on device fits. Holding would keep both late: both rules re-place.
    for policy in ("orbitflow", "orbitflow-no-hold"):
        p, views, cap = _held_case(policy, 1e5)
        out = p.replan(views, cap)
        assert out.placements == {"r0": [Tier.DEVICE] * 8} and p.plan.distances == {"r0": 8, "r1": 8}
        assert not p.plan.violations and p.metrics()["plans_held"] == 0


def test_a_held_placement_that_outgrew_the_device_is_shrunk_not_reshuffled():
    # All on device fits now (2 x 600 tokens x 8 layers x 25 B = 2,400 blocks of 100 B) but not
    # at the window's end (2 x 616 tokens: 2,464 blocks > 2,440): the plan in force is kept, one
    # request moved a distance class down (device -> host), the other untouched; it fits.
    from orbitflow_ray.planner.problem import device_bytes
    p, views, cap = _held_case("orbitflow", 1e12, device_blocks=2440, distances=(8, 8))
    out = p.replan(views, cap)
    assert p.metrics()["plans_held"] == 1
    ds = sorted(p.plan.distances.values())
    assert ds[1] == 8 and ds[0] < 8 and len(out.placements) == 1
    inputs = p.solve_loop.inputs(views, cap)
    assert device_bytes(inputs, [p.plan.distances[v.request_id] for v in views], p.plan.window) <= 2440 * 100
