"""`orbitflow demo`: the offline engine on the default model (`make demo` load-tests the Serve app).

Builds a few long chat prompts, runs them under each KV policy with a device budget too small for
the whole batch (so layers really go to host), and prints the generated text and per-request
TTFT/TPOT, SLO attainment, plus KV bytes per tier and bytes moved over the (emulated) link.
"""

from __future__ import annotations

import argparse
import time

from orbitflow_ray import SamplingParams
from orbitflow_ray.llm import LLM
from orbitflow_ray.metrics import record_from_output, summarize
from orbitflow_ray.model.loader import load_model, load_spec

_TOPICS = ["the history of the printing press", "how tides work", "why the sky is blue",
           "the rules of chess", "how vaccines train the immune system", "the water cycle"]
_FILLER = ("Background notes: long-context serving keeps a key-value cache for every token of every "
           "layer, and the cache grows with each generated token. ")


def _prompts(tok, n: int, target_tokens: int) -> list[list[int]]:
    reps = max(1, target_tokens // len(tok.encode(_FILLER)))
    out = []
    for i in range(n):
        msg = _FILLER * reps + f"\nNow, in two sentences, explain {_TOPICS[i % len(_TOPICS)]}."
        ids = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        out.append(list(ids["input_ids"]) if isinstance(ids, dict) else list(ids))
    return out


def run_demo(args: argparse.Namespace) -> int:
    policies = ["no-offload", "static-uniform", "all-offload", "orbitflow"]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    spec = load_spec(args.model)
    per_token = spec.kv_bytes_per_token_per_layer(4) * spec.num_layers
    prompts = _prompts(load_model(args.model).tokenizer, args.num_prompts, args.prompt_tokens)
    # Device tier sized for about half the batch's KV: offloading policies keep the whole batch
    # running, no-offload has to queue requests.
    need = sum(len(p) + args.max_tokens for p in prompts) * per_token
    for policy in policies:
        t0 = time.perf_counter()
        llm = LLM(model=args.model, kv_policy=policy, device_kv_bytes=need // 2, host_kv_bytes=2 * need,
                  link_bandwidth_bytes_per_s=2e9)
        outs = llm.generate(prompts, sp)
        wall = time.perf_counter() - t0
        stats = llm.kv_stats()
        print(f"\n=== kv_policy={policy}  device budget {need // 2 / 2**20:.1f} MiB "
              f"(batch needs {need / 2**20:.1f} MiB)  wall {wall:.1f}s")
        for o in outs:
            m = o.metrics
            print(f"  [{o.request_id}] prompt {len(o.prompt_token_ids)} tok, TTFT {m.ttft:.2f}s, "
                  f"TPOT {m.tpot * 1e3 if m.tpot else float('nan'):.0f} ms | {o.text.strip()[:90]!r}")
        m = summarize([record_from_output(o) for o in outs], link_bytes=stats["bytes_h2d"])
        print(f"  SLO {llm.engine.config.tpot_slo_s * 1e3:.0f} ms/token: TBT attainment "
              f"{m['tbt_attainment']:.0%}, TPOT attainment {m['tpot_attainment']:.0%}, P95 TBT "
              f"{m['p95_tbt_s'] * 1e3:.0f} ms; pauses {stats['num_pauses']}")
        print(f"  peak KV: device {stats['device_kv_bytes_used_peak'] / 2**20:.1f} MiB, host "
              f"{stats['host_kv_bytes_used_peak'] / 2**20:.1f} MiB; link H2D {stats['bytes_h2d'] / 2**20:.1f} MiB, "
              f"D2H {stats['bytes_d2h'] / 2**20:.1f} MiB; preemptions {stats['num_preemptions']}")
        llm.engine.close()
    return 0
