"""Engine behaviour on a random-initialised preset (fast): policies agree, bad input is rejected
cleanly, KV accounting returns to zero."""

import pytest
import torch

from orbitflow_ray import EngineConfig, SamplingParams
from orbitflow_ray.engine import LLMEngine
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.llm import LLM
from orbitflow_ray.model.loader import build_hf_reference, load_model

PROMPTS = [[1, 5, 9, 200, 31], list(range(3, 140)), [7] * 40, list(range(100, 400))]


def gen(policy, prompts=PROMPTS, max_tokens=12, **kw):
    llm = LLM(model="tiny-llama", kv_policy=policy, **{"device_kv_bytes": 8 << 20, "host_kv_bytes": 8 << 20, **kw})
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    stats = llm.kv_stats()
    llm.engine.close()
    return [o.token_ids for o in outs], stats


@pytest.mark.parametrize("policy", ["static-uniform", "all-offload"])
def test_offloading_policies_match_no_offload(policy):
    base, _ = gen("no-offload")
    got, stats = gen(policy, prefill_chunk_size=64)
    assert got == base
    assert stats["bytes_h2d"] > 0
    assert stats["device_kv_bytes_used"] == stats["host_kv_bytes_used"] == 0


@pytest.mark.parametrize("policy", ["orbitflow", "orbitflow-uniform", "orbitflow-no-pause", "flexgen-plus", "select-n"])
def test_orbitflow_under_pressure_matches_no_offload(policy):
    base, _ = gen("no-offload")
    got, stats = gen(policy, device_kv_bytes=300 << 10, plan_windows=(4,), prefill_chunk_size=64)
    assert got == base
    assert stats["bytes_h2d"] > 0  # the tight budget forced layers to host
    assert stats["device_kv_bytes_used_peak"] <= 300 << 10
    assert stats["device_kv_bytes_used"] == stats["host_kv_bytes_used"] == 0


def test_orbitflow_rejects_what_no_plan_can_hold():
    # 1,508 tokens overflow 64 KiB of device KV even at d = 1, so orbitflow would stream them all-host,
    # but 1 MiB of host KV cannot hold them either
    eng = LLMEngine(EngineConfig(model="tiny-llama", kv_policy="orbitflow", device_kv_bytes=64 << 10,
                                 host_kv_bytes=1 << 20))
    with pytest.raises(ValueError, match="host KV"):
        eng.add_request([1] * 1500, SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="slo_s"):
        SamplingParams(slo_s=-1.0)
    rid = eng.add_request([1] * 20, SamplingParams(max_tokens=4, ignore_eos=True, slo_s=0.5))
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in outs] == [rid] and outs[0].metrics.slo_s == 0.5
    eng.close()


def test_prefill_chunking_and_token_budget_do_not_change_output():
    base, _ = gen("no-offload")
    got, _ = gen("no-offload", prefill_chunk_size=16, max_num_batched_tokens=40, max_num_seqs=2)
    assert got == base


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-llama3"])
def test_greedy_matches_hf_for_each_architecture(model):
    """Tied and untied heads, q/k/v biases (Qwen2), llama3 RoPE scaling; all layers offloaded."""
    loaded = load_model(model)
    hf = build_hf_reference(loaded)
    ids = PROMPTS[3]
    llm = LLM(model=model, kv_policy="static-uniform", device_kv_bytes=8 << 20, host_kv_bytes=8 << 20)
    out = llm.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert out.token_ids == ref[0, len(ids):].tolist()


def test_timestamps_and_metrics():
    llm = LLM(model="tiny-llama", device_kv_bytes=8 << 20)
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    m = out.metrics
    assert len(m.token_times) == 5 and m.token_times == sorted(m.token_times)
    assert m.ttft > 0 and m.tpot > 0 and len(m.tbts) == 4
    assert out.finish_reason == "length"


def test_seeded_sampling_is_reproducible():
    llm = LLM(model="tiny-llama", device_kv_bytes=8 << 20)
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = llm.generate([PROMPTS[0], PROMPTS[2]], sp)
    b = llm.generate([PROMPTS[0]], sp)
    assert a[0].token_ids == b[0].token_ids
    assert len(a[1].token_ids) == 10


def test_stop_token_ids_and_abort():
    eng = LLMEngine(EngineConfig(model="tiny-llama", device_kv_bytes=8 << 20, host_kv_bytes=1 << 20))
    first = LLM.__new__(LLM)
    first.engine = eng
    tok = first.generate([PROMPTS[0]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids
    out = first.generate([PROMPTS[0]], SamplingParams(max_tokens=10, stop_token_ids=[tok[1]], ignore_eos=True))[0]
    assert out.token_ids == tok[: tok.index(tok[1]) + 1] and out.finish_reason == "stop"
    rid = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=50))
    eng.step()
    assert eng.kv.used_bytes(Tier.DEVICE) > 0
    assert eng.abort_request(rid)
    assert eng.kv.used_bytes(Tier.DEVICE) == 0 and not eng.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, match", [
    ({"kv_policy": "nope"}, "unknown kv_policy"),
    ({"model": "no-such-model"}, "no-such-model"),
    ({"device_kv_bytes": 100}, "cannot hold even one KV block"),
    ({"block_size": 0}, "block_size must be positive"),
    ({"backend": "tpu"}, "backend must be one of"),
])
def test_bad_engine_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLMEngine(EngineConfig(**{"model": "tiny-llama", **kwargs}))


def test_bad_requests_are_rejected_and_others_go_on():
    eng = LLMEngine(EngineConfig(model="tiny-llama", device_kv_bytes=1 << 20, host_kv_bytes=1 << 20))
    good = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=8, ignore_eos=True))
    eng.step()
    used = eng.kv.used_bytes(Tier.DEVICE)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="context window"):
        eng.add_request([1] * 5000)
    with pytest.raises(ValueError, match="out of range"):
        eng.add_request([1, 10**9])
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="holds"):  # more KV than the device tier can ever hold
        eng.add_request([1] * 2000, SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1, 2], request_id=good)
    assert eng.kv.used_bytes(Tier.DEVICE) == used
    done = []
    while eng.has_unfinished_requests():
        done += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in done] == [good] and len(done[0].token_ids) == 8
    assert eng.kv.used_bytes(Tier.DEVICE) == 0


def test_generate_with_one_bad_prompt_queues_nothing():
    llm = LLM(model="tiny-llama", device_kv_bytes=1 << 20, host_kv_bytes=1 << 20)
    with pytest.raises(ValueError, match="holds"):  # the second prompt can never fit the device tier
        llm.generate([PROMPTS[0], [1] * 2000], SamplingParams(max_tokens=40))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.used_bytes(Tier.DEVICE) == 0
    assert len(llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_step_results_add_up_to_the_link_counters():
    """The runner's StepResult per step: tokens for the sampling seqs, bytes and link seconds that
    add up to the transfer engine's counters, stall that adds up to its waits (tagged by layer)."""
    from orbitflow_kernels import Direction

    eng = LLMEngine(EngineConfig(model="tiny-llama", kv_policy="static-uniform", device_kv_bytes=8 << 20,
                                 host_kv_bytes=8 << 20, prefill_chunk_size=64))
    results, execute = [], eng.runner.execute
    eng.runner.execute = lambda out: results.append(execute(out)) or results[-1]
    for p in PROMPTS:
        eng.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    link = eng.transfer
    stalls = link.stall_seconds  # before synchronize(), which waits too
    link.synchronize()
    assert len(results) == eng.num_steps and sum(len(r.sampled) for r in results) == 6 * len(PROMPTS)
    # every prefetch is waited for within its step; write-backs may land after the last one
    assert sum(r.h2d_bytes for r in results) == link.bytes_moved[Direction.H2D] > 0
    assert 0 < sum(r.d2h_bytes for r in results) <= link.bytes_moved[Direction.D2H]
    assert sum(r.h2d_busy_s for r in results) == pytest.approx(link.busy_seconds[Direction.H2D])
    assert sum(r.stall_s for r in results) == pytest.approx(sum(stalls.values()))
    assert set(stalls) - {-1} and set(stalls) <= {-1, *range(eng.spec.num_layers)}
    assert all(r.wall_s > 0 and r.stall_s >= 0 for r in results)
    eng.close()
