"""Host<->device copy bandwidth of the transfer engine against torch's own `copy_` of the same bytes,
and the gather kernel against torch indexing. Writes one JSON object to --out.

    PYTHONPATH=.:kernels python3 bench/gpu_transfer.py --out runs/gpu/transfer.json   # GPU, 1 GiB
    PYTHONPATH=.:kernels python3 bench/gpu_transfer.py --dry-run --out /tmp/t.json    # CPU backend, 16 MiB

Rows are KV blocks of Llama-3.1-8B (16 tokens x 8 KV heads x 128 dims, K and V, bf16: 64 KiB), the
unit the engine moves. Patterns: `contiguous` (one run, one memcpy), `runs128` (runs of 128 blocks:
one request's layer at 2K context), `blocks` (every block on its own: a fragmented pool). Each time
is the median of --reps wall times from submit to synchronize (`busy_gb_per_s`: over the engine's
own `busy_seconds` instead); the first repetition of each engine pattern is checked row by row on a
sample, against a poisoned destination.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from orbitflow_kernels import Direction, TransferJob, make_transfer_engine
from orbitflow_kernels.gather import gather_kv

ROW = (2, 8, 16, 128)  # [K|V, Hkv, block_size, D]
DTYPE = torch.bfloat16
CHECK_ROWS = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _mapping(pattern: str, rows: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(src rows, dst rows) covering every row once; runs of the pattern's length in random order."""
    run = {"contiguous": rows, "runs128": 128, "blocks": 1}[pattern]
    run = min(run, rows)
    order = torch.randperm(rows // run, generator=gen)
    src = (order[:, None] * run + torch.arange(run)).reshape(-1)
    return src, torch.arange(src.numel())


def _check(job: TransferJob, gen: torch.Generator) -> int:
    pick = torch.randint(job.src_index.numel(), (CHECK_ROWS,), generator=gen)
    got = job.dst[job.dst_index[pick].to(job.dst.device)].cpu()
    want = job.src[job.src_index[pick].to(job.src.device)].cpu()
    if not torch.equal(got, want):
        raise AssertionError(f"{job.direction.name}: copied rows differ from their source")
    return CHECK_ROWS


def engine_copy(engine, dev, host, pattern: str, direction: Direction, reps: int, gen) -> dict:
    src_rows, dst_rows = _mapping(pattern, dev.shape[0], gen)
    src, dst = (host, dev) if direction == Direction.H2D else (dev, host)
    job = TransferJob(src, dst, src_rows, dst_rows, direction)
    dst.fill_(float("nan"))  # poison: a row the copy missed cannot pass the check
    submit_s: list[float] = []
    busy_s: list[float] = []

    def run() -> None:
        busy0 = engine.busy_seconds[direction]
        t0 = time.perf_counter()
        engine.submit(job)
        submit_s.append(time.perf_counter() - t0)
        engine.synchronize()
        busy_s.append(engine.busy_seconds[direction] - busy0)

    times = _timed(run, dev.device, 1)
    checked = _check(job, gen)
    times += _timed(run, dev.device, reps - 1)
    busy = statistics.median(busy_s)  # the engine's own link time (CUDA: timing events around the copies)
    return _figures(job.nbytes, times) | {"checked_rows": checked, "submit_ms": 1e3 * statistics.median(submit_s),
                                          "busy_gb_per_s": job.nbytes / busy / 1e9 if busy > 0 else None}


def torch_copy(dev: torch.Tensor, host: torch.Tensor, direction: Direction, reps: int) -> dict:
    src, dst = (host, dev) if direction == Direction.H2D else (dev, host)
    times = _timed(lambda: dst.copy_(src, non_blocking=True), dev.device, reps)
    return _figures(src.numel() * src.element_size(), times)


def _figures(nbytes: int, times: list[float]) -> dict:
    t = statistics.median(times)
    return {"bytes": nbytes, "seconds": t, "gb_per_s": nbytes / t / 1e9, "min_seconds": min(times)}


def gather(pool: torch.Tensor, impl: str, requests: int, blocks: int, reps: int, gen) -> dict:
    """Each request's blocks gathered into SDPA layout, as attention does per layer per step."""
    ids = [torch.randint(pool.shape[0], (blocks,), generator=gen).to(pool.device) for _ in range(requests)]
    length = blocks * pool.shape[3]
    expected = [gather_kv(pool, i, length, impl="torch") for i in ids]
    got = [gather_kv(pool, i, length, impl=impl) for i in ids]
    if not all(torch.equal(a, b) for a, b in zip(got, expected)):
        raise AssertionError(f"gather impl={impl} differs from torch indexing")
    times = _timed(lambda: [gather_kv(pool, i, length, impl=impl) for i in ids], pool.device, reps)
    moved = 2 * requests * blocks * pool[0].numel() * pool.element_size()  # read + written
    return _figures(moved, times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU backend, 16 MiB, 2 repetitions")
    ap.add_argument("--mib", type=int, default=1024, help="bytes per copy, MiB")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    backend, mib, reps = ("cpu", 16, 2) if args.dry_run else ("cuda", args.mib, args.reps)
    gen = torch.Generator().manual_seed(0)
    engine = make_transfer_engine(backend)
    row_bytes = torch.Size(ROW).numel() * DTYPE.itemsize
    rows = (mib << 20) // row_bytes
    dev = engine.alloc_device((rows, *ROW), DTYPE)
    host = engine.alloc_host((rows, *ROW), DTYPE)
    result: dict = {"backend": backend, "row_bytes": row_bytes, "rows": rows, "reps": reps,
                    "host_pinned": bool(host.is_pinned()) if backend == "cuda" else None, "copy": {}}
    dev.normal_()
    host.copy_(dev)
    _sync(dev.device)
    for pattern in ("contiguous", "runs128", "blocks"):
        result["copy"][f"engine_{pattern}"] = {
            d.value: engine_copy(engine, dev, host, pattern, d, reps, gen) for d in (Direction.H2D, Direction.D2H)}
        print(f"engine {pattern}: " + ", ".join(f"{d} {v['gb_per_s']:.1f} GB/s"
                                                for d, v in result["copy"][f"engine_{pattern}"].items()), flush=True)
    result["copy"]["torch_same_buffers"] = {d.value: torch_copy(dev, host, d, reps) for d in (Direction.H2D, Direction.D2H)}
    if backend == "cuda":
        own = torch.empty_like(host, pin_memory=True)
        result["copy"]["torch_own_pinned"] = {d.value: torch_copy(dev, own, d, reps) for d in (Direction.H2D, Direction.D2H)}
        del own
    result["engine_over_torch"] = {
        d: result["copy"]["engine_contiguous"][d]["gb_per_s"] / result["copy"]["torch_same_buffers"][d]["gb_per_s"]
        for d in ("h2d", "d2h")}
    pool = dev.view(rows, *ROW)
    requests, blocks = (8, 128) if rows >= 128 else (2, rows)
    impls = ["torch", "cupy"] if backend == "cuda" else ["torch"]
    result["gather"] = {"requests": requests, "blocks": blocks,
                        **{impl: gather(pool, impl, requests, blocks, 10 * reps, gen) for impl in impls}}
    engine.close()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"engine_over_torch": result["engine_over_torch"]}))


if __name__ == "__main__":
    main()
