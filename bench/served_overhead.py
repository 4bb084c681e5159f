"""One batch served against the same batch in process: what Ray Serve, HTTP and the serving worker
(engine thread, event loop, telemetry, the central planner) cost the engine (issue 14 item 5).

    .venv/bin/python bench/served_overhead.py                       # deployments/config.yaml
    .venv/bin/python bench/served_overhead.py --no-planner --reps 3
    .venv/bin/python bench/served_overhead.py --requests 2 --max-tokens 8 --reps 1   # smoke

`--requests` greedy completions of `--prompt-words` words each, all sent at once, `--max-tokens`
tokens each (ignore_eos), timed from the first send to the last answer:
  1. in process: an `LLM` with the config's engine args (in a subprocess with no Ray running), after
     one warm-up batch;
  2. served: the app from the config on a local Ray (`load_tests.app.ManagedApp`), the same batch as
     non-streamed completions, after one warm-up request;
  3. in process again (the box drifts: the two in-process runs bracket the served ones).
Prints each run's wall time, their medians and the ratio served / in process, the steps and link
bytes a batch took each way (the same work or not), the CPU seconds each
process of the Ray session used over the served runs, and the worker's busiest threads (its engine
thread, torch's OpenMP helper, the copy thread): seconds on a CPU and seconds runnable but waiting
for one (/proc schedstat), so time lost to other processes shows apart from time spent waiting.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from load_tests.app import ManagedApp, fetch_state, load_serve_config  # noqa: E402
from _noise import proc_table  # noqa: E402
from idle_stream import post  # noqa: E402


def prompts(n: int, words: int) -> list[str]:
    return [f"{i} " + " ".join(["sea"] * words) for i in range(n)]


COUNTERS = ("num_steps", "bytes_h2d", "bytes_d2h")


def in_process(args) -> tuple[list[float], dict, list[tuple[float, float]]]:
    """Wall seconds of `--reps` batches through `LLM.generate` (this process; no Ray), and the
    engine's step and link-byte counters over them, and its busiest threads (`_busiest_threads`)."""
    import torch

    from orbitflow_ray import LLM, SamplingParams

    spec = load_serve_config(args.config)
    if spec.app_args.torch_threads:
        torch.set_num_threads(spec.app_args.torch_threads)
    llm = LLM(model=spec.app_args.model, **spec.args.get("engine", {}))
    batch = prompts(args.requests, args.prompt_words)
    llm.generate(batch, SamplingParams(max_tokens=4, ignore_eos=True))
    walls, k0, threads0 = [], llm.kv_stats(), _thread_sched(os.getpid())
    for _ in range(args.reps):
        t0 = time.perf_counter()
        llm.generate(batch, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0))
        walls.append(time.perf_counter() - t0)
    k1, threads1 = llm.kv_stats(), _thread_sched(os.getpid())
    llm.engine.close()
    return walls, {k: k1[k] - k0[k] for k in COUNTERS}, _busiest_threads(threads0, threads1)


def _worker_counters(url: str) -> dict | None:
    """The one worker's step and link-byte counters from the planner's state (None without it)."""
    state = fetch_state(url)
    workers = list((state or {}).get("workers", {}).values())
    return {k: workers[0][k] for k in COUNTERS} if len(workers) == 1 else None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:60]
    except OSError:
        return "?"


def _thread_sched(pid: int) -> dict[str, tuple[float, float]]:
    """Per thread of `pid`: seconds on a CPU and seconds runnable but waiting for one (schedstat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            on_cpu, run_wait, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        out[tid] = (int(on_cpu) / 1e9, int(run_wait) / 1e9)
    return out


def _busiest_threads(before: dict, after: dict) -> list[tuple[float, float]]:
    """(s on a CPU, s runnable but waiting) of each thread alive at both snapshots, busiest first."""
    return sorted(((after[t][0] - before[t][0], after[t][1] - before[t][1]) for t in after if t in before),
                  reverse=True)


def served(args) -> tuple[list[float], dict | None, list[tuple[float, str]], list[tuple[float, float]]]:
    """Wall seconds of `--reps` batches through the served app; the worker's counters (None with no
    planner to report them), the six busiest processes' CPU-s, and the worker's threads' seconds on a
    CPU and waiting for one, busiest first, over them."""
    spec = load_serve_config(args.config)
    if args.no_planner:
        spec.args["planner"] = False
    batch = prompts(args.requests, args.prompt_words)
    with ManagedApp(spec, port=0) as app:
        app.deploy()
        url = f"{app.url}/v1/completions"
        model = spec.app_args.model
        post(url, {"model": model, "prompt": "Hi", "max_tokens": 4})
        time.sleep(2 * spec.app_args.telemetry_period_s + 0.5)  # the worker's report reaches the planner
        c0 = _worker_counters(app.url)
        procs0 = proc_table()
        worker = next((p for p in procs0 if "OrbitFlowWorker" in _cmdline(p)), None)
        threads0 = _thread_sched(worker) if worker is not None else {}
        walls = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
                outs = list(pool.map(lambda p: post(url, {"model": model, "prompt": p, "temperature": 0,
                                                           "max_tokens": args.max_tokens, "ignore_eos": True}),
                                     batch))
            walls.append(time.perf_counter() - t0)
            assert all(o["usage"]["completion_tokens"] == args.max_tokens for o in outs), outs
        procs1, threads1 = proc_table(), _thread_sched(worker) if worker is not None else {}
        busiest = sorted((procs1[p][1] - procs0[p][1], p) for p in procs1 if p in procs0)[-6:]
        by_proc = [(cpu, _cmdline(p)) for cpu, p in busiest]  # named while the app's processes live
        time.sleep(2 * spec.app_args.telemetry_period_s + 0.5)
        c1 = _worker_counters(app.url)
    counters = {k: c1[k] - c0[k] for k in COUNTERS} if c0 and c1 else None
    return walls, counters, by_proc, _busiest_threads(threads0, threads1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "deployments" / "config.yaml"))
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=250)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2, help="batches timed in each of the three runs")
    ap.add_argument("--no-planner", action="store_true", help="the app with planner: false")
    ap.add_argument("--in-process-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.in_process_only:
        walls, counters, threads = in_process(args)
        print(json.dumps({"walls": walls, "counters": counters, "threads": threads}))
        return
    child = [sys.executable, __file__, "--in-process-only", "--config", args.config, "--requests",
             str(args.requests), "--prompt-words", str(args.prompt_words), "--max-tokens", str(args.max_tokens),
             "--reps", str(args.reps)]

    def run_child() -> dict:
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run_child()
    walls, counters, by_proc, by_thread = served(args)
    second = run_child()
    before, after = first["walls"], second["walls"]
    inproc = before + after
    fmt = ", ".join
    print(f"batch: {args.requests} x {args.prompt_words} words, {args.max_tokens} tokens each; "
          f"config {args.config}{' (planner: false)' if args.no_planner else ''}")
    print(f"in process: {fmt(f'{w:.2f}' for w in before)} | {fmt(f'{w:.2f}' for w in after)} s "
          f"(median {statistics.median(inproc):.2f})")
    print(f"served:     {fmt(f'{w:.2f}' for w in walls)} s (median {statistics.median(walls):.2f})")
    print(f"served / in process: {statistics.median(walls) / statistics.median(inproc):.2f}x")

    def per_batch(c: dict | None) -> str:
        if c is None:
            return "not reported (no planner)"
        return (f"{c['num_steps'] / args.reps:.0f} steps, "
                f"{(c['bytes_h2d'] + c['bytes_d2h']) / args.reps / 2**20:.0f} MiB over the link")
    print(f"a batch in process: {per_batch(first['counters'])} (then {per_batch(second['counters'])}); "
          f"served: {per_batch(counters)}")
    span = sum(walls)
    print(f"CPU-s over the served runs ({span:.1f} s wall, {os.cpu_count()} CPUs), busiest processes:")
    for cpu, cmd in by_proc[::-1]:
        print(f"  {cpu:7.2f}  {cmd}")

    def threads(by: list, wall: float) -> str:
        return (fmt(f"{c:.2f} / {w:.2f}" for c, w in by[:4])
                + f" (the busiest asleep {wall - by[0][0] - by[0][1]:.2f} of {wall:.2f} s)")
    print("busiest threads, s on a CPU / s runnable but waiting for one:")
    print(f"  served worker: {threads(by_thread, span)}")
    for name, run in (("in process, before", first), ("in process, after", second)):
        print(f"  {name}: {threads([tuple(t) for t in run['threads']], sum(run['walls']))}")


if __name__ == "__main__":
    main()
