"""Chunked prefill writes each chunk's KV over the link once (`kv/prompt_stage.py`): the link bytes of
a long prompt are the KV of its host layers, not the prior context re-copied for every chunk."""

import pytest

from orbitflow_ray import SamplingParams
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.llm import LLM
from orbitflow_ray.model.presets import get_preset

PROMPT_TOKENS, CHUNK = 16_384, 1024


@pytest.mark.slow  # about 20 s on an idle 2-core machine: a 16K-token prefill
def test_16k_prefill_moves_each_host_layer_once():
    spec = get_preset("tiny-llama-32k")
    per_token = spec.kv_bytes_per_token_per_layer(4)
    # Staging inside the device tier: two slots and a prompt region, each one 32K-token layer.
    llm = LLM(model="tiny-llama-32k", kv_policy="static-uniform", device_kv_bytes=64 << 20,
              staging_kv_bytes=3 * 32768 * per_token, host_kv_bytes=64 << 20, prefill_chunk_size=CHUNK,
              max_num_batched_tokens=CHUNK)
    eng = llm.engine
    prompt = [(7 * i + 3) % 500 + 2 for i in range(PROMPT_TOKENS)]
    eng.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    host_layers, steps = 0, 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
        if eng.kv.request_ids():
            host_layers = eng.kv.placement(eng.kv.request_ids()[0]).count(Tier.HOST)
    stats = eng.kv_stats()
    eng.close()
    assert steps == PROMPT_TOKENS // CHUNK and host_layers == spec.num_layers // 2
    host_kv = host_layers * PROMPT_TOKENS * per_token
    link = stats["bytes_h2d"] + stats["bytes_d2h"]
    print(f"link bytes {link}, host-layer KV {host_kv}; re-staging every chunk would read "
          f"{host_layers * per_token * CHUNK * sum(range(steps))} more")
    assert abs(link - host_kv) <= host_layers * 16 * per_token  # within a block per layer
    assert stats["staging_bytes"] <= stats["staging_bytes_reserved"]
