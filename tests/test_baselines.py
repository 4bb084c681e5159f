"""The adaptive baselines (`flexgen-plus`, `select-n`): the fraction or distance each picks on
hand-built views with a known answer, and both under pressure through the real scheduler."""


import orbitflow_ray.planner.baselines  # noqa: F401  (registers the baselines)
from orbitflow_ray.costmodel import CostModel, OnlineCostModel
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner import make_policy
from orbitflow_ray.planner.base import CapacityView, RequestView
from orbitflow_ray.planner.orbitflow import tiers_for_distance
from orbitflow_ray.planner.static import uniform_placement
from test_scheduler import drive, make, req

D, H = Tier.DEVICE, Tier.HOST


def view(i, num_tokens, placement=None, slo_s=None):
    return RequestView(f"r{i}", num_tokens, num_tokens, 100, 0.0,
                       None if placement is None else tuple(placement), slo_s=slo_s)


def cap(num_layers, device_blocks, block_size=4):
    return CapacityView(num_layers, block_size, 100, device_blocks, device_blocks, 10_000, 10_000)


# ---- flexgen-plus ------------------------------------------------------------------------------
def test_flexgen_plus_picks_the_smallest_fraction_that_fits_the_next_step():
    p = make_policy("flexgen-plus", 4)
    # Next step: 8 tokens -> 2 blocks, 12 tokens -> 3 blocks: 5 blocks per device layer.
    running = [view(0, 7, [D] * 4), view(1, 11, [D] * 4)]
    assert p.replan(running, cap(4, 20)) is None  # all four layers fit: nothing changes
    for blocks, k in [(19, 1), (15, 1), (14, 2), (10, 2), (9, 3), (5, 3), (4, 4), (0, 4)]:
        plan = p.replan(running, cap(4, blocks))
        assert plan.placements == {"r0": uniform_placement(4, k / 4), "r1": uniform_placement(4, k / 4)}
        assert plan.pause == [] and p.fraction == k / 4
    # A block edge: 8 tokens need 3 blocks next step (the token it writes), not 2.
    assert p.replan([view(0, 8, [D] * 4)], cap(4, 11)).placements["r0"] == uniform_placement(4, 1 / 4)


def test_flexgen_plus_moves_only_requests_whose_placement_changes():
    p = make_policy("flexgen-plus", 4)
    half = uniform_placement(4, 0.5)
    plan = p.replan([view(0, 7, half), view(1, 11, [D] * 4)], cap(4, 10))
    assert plan.placements == {"r1": half}


def test_flexgen_plus_admits_by_offloading_the_whole_batch():
    p = make_policy("flexgen-plus", 4)
    running = [view(0, 7, [D] * 4)]  # 2 blocks per device layer next step
    plan = p.admit(view(1, 11), running, cap(4, 10))  # with the newcomer: 5 -> two device layers
    half = uniform_placement(4, 0.5)
    assert plan.placements == {"r0": half, "r1": half} and plan.pause == []
    plan = p.admit(view(1, 11), running, cap(4, 0))  # all on host always fits the device
    assert plan.placements == {"r0": [H] * 4, "r1": [H] * 4}
    # The newcomer's placement is returned even when it already holds it (a swapped-out request).
    plan = p.admit(view(1, 11, [H] * 4), [view(0, 7, [H] * 4)], cap(4, 0))
    assert plan.placements == {"r1": [H] * 4}
    assert p.place_new(view(1, 11), cap(4, 0)) == [H] * 4


# ---- select-n ----------------------------------------------------------------------------------
def slow_link_policy(**kw):
    """L = 8, c = 1 ms per layer whatever the batch, and one layer of a 100-token request takes
    2.5 ms over the link (100 tokens x 25 bytes at 1 MB/s). Hidden behind compute only for d >= 3
    (3 layers of prefetch window): T = 8 ms for d >= 3, 9 ms for d = 2 (layers 2, 5), 14 ms for d = 1."""
    cost = OnlineCostModel(CostModel(8, compute_a_s=1e-3, compute_b_s_per_token=0.0,
                                     compute_p_s_per_token=0.0, link_bytes_per_s=1e6))
    return make_policy("select-n", 8, cost_model=cost, **kw)


def distance_of(tiers):
    return next(d for d in (1, 2, 3, 4, 5, 7, 8) if tiers_for_distance(d, 8) == tiers)


def test_select_n_spends_slack_on_memory():
    p = slow_link_policy(slo_s=0.0085)
    running = [view(0, 100, [D] * 8)]  # 26 blocks per device layer next step
    # d = 2 and d = 3 both offload two layers; only d = 3 meets 8.5 ms.
    assert distance_of(p.replan(running, cap(8, 1000)).placements["r0"]) == 3
    assert p.distance == 3 and p.metrics()["slo_misses"] == 0
    # A request's own SLO overrides the default; the tightest in the batch rules.
    assert distance_of(p.choose([view(0, 100, slo_s=0.015)], cap(8, 1000))) == 1
    assert distance_of(p.choose([view(0, 100, slo_s=0.015), view(1, 1, slo_s=0.01)], cap(8, 1000))) == 3


def test_select_n_misses_the_slo_only_when_it_must():
    p = slow_link_policy(slo_s=0.005)  # below 8 ms of compute: nothing meets it
    # Fastest (8 ms: d >= 3), and among those the least device KV: d = 3.
    assert distance_of(p.choose([view(0, 100)], cap(8, 1000))) == 3
    assert p.metrics()["slo_misses"] == 1
    # Only d = 1 (four device layers, 104 blocks) fits: it is chosen however slow.
    p = slow_link_policy(slo_s=1.0)
    assert distance_of(p.choose([view(0, 100)], cap(8, 104))) == 1
    assert p.choose([view(0, 100)], cap(8, 103)) is None
    # Nothing fits: replan falls back to the largest offload, admission waits.
    assert p.replan([view(0, 100, [D] * 8)], cap(8, 103)).placements["r0"] == tiers_for_distance(1, 8)
    assert p.admit(view(1, 100), [view(0, 100, [D] * 8)], cap(8, 200)) is None
    assert p.place_new(view(1, 100), cap(8, 0)) == tiers_for_distance(1, 8)


def test_select_n_offloads_more_when_the_slo_is_loose():
    # 160 tokens: 4 ms per layer over the link. T = 20 ms at d = 1, 12 at d = 2, 10 at d = 3, else 8.
    running = [view(0, 100, [D] * 8), view(1, 60, [D] * 8)]
    host = [slow_link_policy(slo_s=slo).replan(running, cap(8, 10_000)).placements["r0"].count(H)
            for slo in (0.0085, 0.011, 0.025)]
    assert host == [1, 2, 4]


# ---- both, through the scheduler ---------------------------------------------------------------
def test_unknown_options_are_ignored():
    for name in ("flexgen-plus", "select-n"):
        p = make_policy(name, 4, cost_model=None, unknown_option=1, windows=(32,), seed=3)
        assert p.name == name and p.num_layers == 4


def test_pressure_finishes_everything_and_offloads():
    for policy in ("flexgen-plus", "select-n"):
        s = make(policy, device_blocks=60, host_blocks=400, max_num_batched_tokens=64,
                 prefill_chunk_size=32, tpot_slo_s=10.0)
        reqs = [req(i, 20 + 4 * i, 40) for i in range(5)]
        for r in reqs:
            s.add_request(r)
        steps = drive(s)
        assert all(len(r.output_token_ids) == 40 for r in reqs)
        assert any(m.dst_tier == Tier.HOST for out in steps for m in out.moves)
        assert s.kv.used_bytes(Tier.DEVICE) == s.kv.used_bytes(Tier.HOST) == 0
        assert s.num_pauses == 0


# The random admit/grow/finish property test covers both policies in test_scheduler.py.
