"""Staging inside the device tier (`device_tier.py`, `EngineConfig.staging_kv_bytes`): the scheduler
never stages more of a layer per step than a slot holds, the store never allocates more than the
reservation, KV plus staging stays within device_kv_bytes, and the planner's capacity excludes it."""

import pytest

from kv_probe import resident_pages
from orbitflow_ray import EngineConfig, SamplingParams, device_tier
from orbitflow_ray.engine import LLMEngine
from orbitflow_ray.kv.blocks import Tier

PROMPTS = [list(range(3 + i, 300 + i)) for i in range(8)]
BLOCK = 16 * 256  # tiny-llama: 16 tokens x 2 (K, V) x 2 heads x 16 dims x 4 bytes
SLOT = 128  # blocks of one layer of a 2,048-token sequence (tiny-llama's window)


def _run(policy, **kw):
    eng = LLMEngine(EngineConfig(model="tiny-llama", kv_policy=policy, device_kv_bytes=4 << 20,
                                 host_kv_bytes=8 << 20, prefill_chunk_size=64, **kw))
    ids = [eng.add_request(p, SamplingParams(max_tokens=24, ignore_eos=True)) for p in PROMPTS]
    outs, deferred, checks = {}, 0, []
    schedule = eng.scheduler.schedule

    def counting_schedule():
        nonlocal deferred
        out = schedule()
        deferred += len(out.seqs) < len(eng.scheduler.running)
        return out

    eng.scheduler.schedule = counting_schedule
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
        stats = eng.kv_stats()
        checks.append((stats["staging_bytes"], stats["staging_bytes_reserved"], stats["device_kv_bytes_used"],
                       eng.scheduler.capacity()))
    eng.close()
    return [outs[r] for r in ids], deferred, checks


def test_staging_stays_in_its_reservation_and_outputs_do_not_change():
    base, _, _ = _run("no-offload")
    got, deferred, checks = _run("static-uniform", staging_kv_bytes=3 * SLOT * BLOCK)
    assert got == base
    assert deferred > 0  # eight 300-token requests need 8 x 20 > 128 blocks of a layer: some waited
    for staging, reserved, used, cap in checks:
        assert reserved == 3 * SLOT * BLOCK and staging <= reserved
        assert used + reserved <= 4 << 20
        assert cap.staging_blocks == 3 * SLOT and cap.device_total_blocks == (4 << 20) // BLOCK - 3 * SLOT


def test_staging_reservation_must_hold_a_full_length_sequence():
    with pytest.raises(ValueError, match="staging_kv_bytes"):
        LLMEngine(EngineConfig(model="tiny-llama", device_kv_bytes=4 << 20, staging_kv_bytes=3 * SLOT * BLOCK - 1))
    with pytest.raises(ValueError, match="cannot hold even one KV block"):
        LLMEngine(EngineConfig(model="tiny-llama", device_kv_bytes=3 * SLOT * BLOCK, staging_kv_bytes=3 * SLOT * BLOCK))


@pytest.mark.parametrize("free_ram, expected", [(64 << 30, 4 << 30), (2 << 30, 1 << 30)])
def test_default_device_tier_is_sized_like_vllm_and_holds_staging(monkeypatch, free_ram, expected):
    """cpu: vLLM's 4 GiB CPU KV space, at most half the free RAM; staging the larger of three
    full-length slots and 1/8 of the tier, inside it."""
    monkeypatch.setattr(device_tier, "_available_ram", lambda: free_ram)
    eng = LLMEngine(EngineConfig(model="tiny-llama"))
    cfg, cap = eng.config, eng.scheduler.capacity()
    assert cfg.device_kv_bytes == expected and cfg.staging_kv_bytes == expected // 8
    assert cap.staging_blocks * BLOCK == expected // 8
    assert cap.device_total_blocks * BLOCK == expected - expected // 8
    assert eng.kv.pools[Tier.DEVICE].num_blocks == cap.device_total_blocks
    eng.close()


@pytest.mark.parametrize("prefault", [False, True])
def test_prefault_device_kv_reaches_the_cpu_device_tier(prefault):
    """EngineConfig.prefault_device_kv: the engine's CPU device pool is written at start (every page
    in RAM, by mincore) or mapped lazily (the default: none until KV is written)."""
    eng = LLMEngine(EngineConfig(model="tiny-llama", device_kv_bytes=48 << 20, prefault_device_kv=prefault))
    resident, pages = resident_pages(eng.runner.store.pools[Tier.DEVICE])
    assert pages > 0 and resident == (pages if prefault else 0)
    eng.close()
