"""A load test's trace replayed through one in-process engine, step by step: no Ray, no HTTP, the
same engine config (`--config`), trace and prompts as `python -m load_tests` would send. Arrivals are
added on the wall clock; the engine steps back to back while it has work, as a serving worker's
engine thread does. Each step's wall time is split into planning (`Scheduler.schedule`: the
policy's re-plans, the fast path, Pause-for-SLO) and execution (the runner: copies and layer math),
with the step's link bytes, copies and stall, and the plan's predicted step time.

    .venv/bin/python bench/engine_replay.py --policies orbitflow,orbitflow-uniform --workload longbench \\
        --min-input-tokens 500 --max-input-tokens 1000 --min-output-tokens 32 --max-output-tokens 64 \\
        --rate 0.4 --duration 180 --warmup 0 --seed 1 --step-log runs/replay

Prints per policy: goodput and attainment (`metrics.summarize` on the engine's own token times,
not paced by Token-Deposit), steps, and the split of wall time; `--step-log DIR` writes each step as
a JSON line (DIR/<policy>.jsonl). Takes the load-test options (`python -m load_tests --help`);
those about the HTTP client are ignored.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from load_tests.app import with_policy  # noqa: E402
from load_tests.cli import build_parser  # noqa: E402
from load_tests.prompts import PromptBuilder, load_prompt_tokenizer  # noqa: E402
from load_tests.run import _context_len, _resolve, make_trace  # noqa: E402
from orbitflow_ray.engine import LLMEngine  # noqa: E402
from orbitflow_ray.metrics import record_from_output, summarize  # noqa: E402
from orbitflow_ray.sampling_params import SamplingParams  # noqa: E402
from orbitflow_ray.serving.app_config import AppArgs  # noqa: E402


def replay(engine: LLMEngine, trace, prompts, ttft_slo_s: float | None) -> tuple[list, list[dict]]:
    """Run the trace; returns the finished outputs and one dict per executed step."""
    steps: list[dict] = []
    sched, runner, policy = engine.scheduler, engine.runner, engine.policy
    schedule, execute = sched.schedule, runner.execute
    cur: dict = {}

    def timed_schedule():
        t = time.perf_counter()
        out = schedule()
        cur.update(schedule_s=time.perf_counter() - t, moves=len(out.moves),
                   predicted_s=getattr(getattr(policy, "triggers", None), "predicted_s", None))
        return out

    def timed_execute(out):
        t = time.perf_counter()
        res = execute(out)
        cur.update(execute_s=time.perf_counter() - t, h2d_bytes=res.h2d_bytes, d2h_bytes=res.d2h_bytes,
                   stall_s=res.stall_s, num_seqs=len(out.seqs), new_tokens=out.num_batched_tokens,
                   decodes=sum(len(s.token_ids) == 1 for s in out.seqs),
                   context=sum(s.start_pos for s in out.seqs))
        return res

    sched.schedule, runner.execute = timed_schedule, timed_execute
    pending = list(zip(trace, prompts))
    done, t0 = [], time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and pending[0][0].arrival_s <= now:
            r, prompt = pending.pop(0)
            params = SamplingParams(max_tokens=r.output_tokens, ignore_eos=True, temperature=0.0,
                                    slo_s=r.tpot_slo_s, ttft_slo_s=r.ttft_slo_s or ttft_slo_s)
            engine.add_request(prompt, params, request_id=r.request_id, arrival_time=t0 + r.arrival_s)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0][0].arrival_s - (time.perf_counter() - t0)))
            continue
        cur.clear()
        started = time.perf_counter()
        outs = engine.step()
        if "execute_s" in cur:
            steps.append({"t": started - t0, "wall_s": time.perf_counter() - started, **cur})
        done += [o for o in outs if o.finished]
    return done, steps


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    p.add_argument("--step-log", type=Path, help="write each step as a JSON line to DIR/<policy>.jsonl")
    o = p.parse_args(argv)
    spec, app_args = _resolve(o)
    trace, _ = make_trace(o, _context_len(app_args.model))
    builder = PromptBuilder(load_prompt_tokenizer(o.tokenizer or app_args.model), o.seed)
    prompts = [builder.build(i, r.input_tokens) for i, r in enumerate(trace)]
    torch.set_num_threads(app_args.torch_threads or torch.get_num_threads())
    ttft = o.ttft_slo or app_args.default_ttft_slo_s
    for policy in o.policies or [None]:
        args = AppArgs.model_validate(with_policy(app_args.model_dump(), policy))
        engine = LLMEngine(args.engine_config())
        try:
            outs, steps = replay(engine, trace, prompts, ttft)
            kv = engine.kv_stats()
        finally:
            engine.close()
        m = summarize([record_from_output(x) for x in outs])
        s = {k: np.array([st.get(k) or 0.0 for st in steps], dtype=float)
             for k in ("wall_s", "schedule_s", "execute_s", "stall_s", "h2d_bytes", "moves", "num_seqs")}
        dec = np.array([st["decodes"] == st["new_tokens"] for st in steps])
        pred = np.array([st["predicted_s"] or np.nan for st in steps], dtype=float)
        name = policy or engine.config.kv_policy
        print(f"{policy}: goodput {m['goodput_req_s']:.3f} req/s, TTFT att {m['ttft_attainment']:.3f}, "
              f"TPOT att {m['tpot_attainment']:.3f}, p95 TPOT {m['p95_tpot_s'] * 1e3:.0f} ms, "
              f"{len(outs)} finished, {len(steps)} steps ({dec.sum()} decode-only), link "
              f"{(kv['bytes_h2d'] + kv['bytes_d2h']) / 2**30:.1f} GiB")
        print(f"  wall {s['wall_s'].sum():.1f} s = schedule {s['schedule_s'].sum():.1f} + execute "
              f"{s['execute_s'].sum():.1f} (stall {s['stall_s'].sum():.1f}); moves {int(s['moves'].sum())}, "
              f"h2d {s['h2d_bytes'].sum() / 2**30:.1f} GiB")
        if dec.any():
            w, sc = s["wall_s"][dec], s["schedule_s"][dec]
            ok = dec & ~np.isnan(pred)
            ratio = s["wall_s"][ok] / pred[ok] if ok.any() else np.array([np.nan])
            print(f"  decode-only steps: wall p50 {np.median(w) * 1e3:.0f} ms p95 {np.percentile(w, 95) * 1e3:.0f}"
                  f" ms, schedule p50 {np.median(sc) * 1e3:.1f} ms p95 {np.percentile(sc, 95) * 1e3:.1f} ms, "
                  f"batch {s['num_seqs'][dec].mean():.1f}, wall/predicted p50 {np.nanmedian(ratio):.2f} "
                  f"p95 {np.nanpercentile(ratio, 95):.2f}")
        if o.step_log:
            o.step_log.mkdir(parents=True, exist_ok=True)
            with open(o.step_log / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(st) + "\n" for st in steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
