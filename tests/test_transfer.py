"""Transfer engines, gather and scatter.

    PYTHONPATH=.:kernels .venv/bin/python -m pytest tests/test_transfer.py -q

CPU tests always run; CUDA tests need cupy and a GPU and are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orbitflow_kernels import (CpuTransferEngine, CudaTransferEngine, Direction, TransferError, TransferJob,
                               gather_blocks, make_transfer_engine, scatter_rows)
from orbitflow_kernels.cpu import copy_rows
from orbitflow_kernels.cuda import GPU_HELP, _check_rows, contiguous_runs

ROW = (2, 4, 2, 8)  # [2, block_size, Hkv, D]: a small KV block


def _idx(values) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.int64)


def _random_jobs(gen: torch.Generator, dev: torch.Tensor, host: torch.Tensor, count: int):
    """(direction, src_rows, dst_rows) with distinct destination rows per job."""
    ends = {Direction.H2D: (host, dev), Direction.D2H: (dev, host), Direction.D2D: (dev, dev)}
    dirs = list(ends)
    for _ in range(count):
        direction = dirs[int(torch.randint(3, (1,), generator=gen))]
        src, dst = ends[direction]
        n = int(torch.randint(0, min(src.shape[0], dst.shape[0]) + 1, (1,), generator=gen))
        src_rows = torch.randint(src.shape[0], (n,), generator=gen)
        dst_rows = torch.randperm(dst.shape[0], generator=gen)[:n]
        yield direction, src, dst, src_rows, dst_rows


def _run_against_reference(engine, dev, host, seed: int, count: int = 40) -> None:
    ref_dev, ref_host = dev.cpu().clone(), host.clone()
    ref_of = {id(dev): ref_dev, id(host): ref_host}
    gen = torch.Generator().manual_seed(seed)
    for direction, src, dst, s, d in _random_jobs(gen, dev, host, count):
        engine.submit(TransferJob(src, dst, s, d, direction))
        copy_rows(TransferJob(ref_of[id(src)], ref_of[id(dst)], s, d, direction))
    engine.synchronize()
    torch.testing.assert_close(dev.cpu(), ref_dev, rtol=0, atol=0)
    torch.testing.assert_close(host, ref_host, rtol=0, atol=0)


# ---- CPU engine ----------------------------------------------------------------------------------
@pytest.fixture
def cpu_engine():
    with CpuTransferEngine() as engine:
        yield engine


def test_cpu_random_jobs_match_reference(cpu_engine):
    dev = cpu_engine.alloc_device((12, *ROW), torch.float32)
    host = cpu_engine.alloc_host((20, *ROW), torch.float32)
    assert dev.abs().sum() == 0 and host.abs().sum() == 0
    dev.copy_(torch.randn_like(dev))
    host.copy_(torch.randn_like(host))
    _run_against_reference(cpu_engine, dev, host, seed=0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=8, unique=True), min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_cpu_fifo_write_then_read_sees_written_rows(batches, rnd):
    """D2H write of rows, then an H2D read of the same host rows into a fresh buffer: the read
    must see the written data, for every batch, without a wait between the two submits."""
    with CpuTransferEngine() as engine:
        host = engine.alloc_host((8, *ROW), torch.float32)
        checks = []
        for step, rows in enumerate(batches):
            written = torch.full((len(rows), *ROW), float(step + 1)) + torch.rand(len(rows), *ROW)
            engine.submit(TransferJob(written, host, torch.arange(len(rows)), _idx(rows), Direction.D2H))
            order = rows[:]
            rnd.shuffle(order)
            readback = engine.alloc_device((len(rows), *ROW), torch.float32)
            src_pos = [rows.index(r) for r in order]
            read = TransferJob(host, readback, _idx(order), torch.arange(len(rows)), Direction.H2D)
            job = engine.submit(read)
            checks.append((job, readback, written[src_pos]))
        for job, readback, expected in checks:
            engine.wait(job)
            torch.testing.assert_close(readback, expected, rtol=0, atol=0)


def test_bandwidth_limit_costs_wall_time():
    with CpuTransferEngine(bandwidth_bytes_per_s=80e6) as engine:
        src = torch.randn(8, 1 << 18)  # 8 rows x 1 MiB = 8 MiB
        dst = engine.alloc_device(tuple(src.shape), src.dtype)
        t0 = time.perf_counter()
        engine.wait(engine.submit(TransferJob(src, dst, torch.arange(8), torch.arange(8), Direction.H2D)))
        assert time.perf_counter() - t0 >= 0.09  # 8.4 MB / 80 MB/s = 0.105 s
        torch.testing.assert_close(dst, src, rtol=0, atol=0)
        # Two back-to-back halves are serialised like one link: together at least as long.
        t0 = time.perf_counter()
        engine.submit(TransferJob(src, dst, torch.arange(4), torch.arange(4), Direction.H2D))
        engine.submit(TransferJob(dst, src, torch.arange(4, 8), torch.arange(4, 8), Direction.D2H))
        engine.synchronize()
        assert time.perf_counter() - t0 >= 0.09


def test_d2d_is_not_rate_limited():
    with CpuTransferEngine(bandwidth_bytes_per_s=1e6) as engine:
        pool = engine.alloc_device((8, 1 << 18), torch.float32)  # 8 MiB: 8 s if it were limited
        t0 = time.perf_counter()
        job = TransferJob(pool, pool, torch.arange(4), torch.arange(4, 8), Direction.D2D)
        engine.wait(engine.submit(job))
        assert time.perf_counter() - t0 < 2.0
        assert engine.bytes_moved[Direction.D2D] == 4 << 20


def test_copy_overlaps_compute_on_caller_thread():
    with CpuTransferEngine(bandwidth_bytes_per_s=40e6) as engine:
        src = torch.randn(12, 1 << 18)  # 12 MiB at 40 MB/s: ~0.31 s on the link
        dst = engine.alloc_device(tuple(src.shape), src.dtype)
        t0 = time.perf_counter()
        job = engine.submit(TransferJob(src, dst, torch.arange(12), torch.arange(12), Direction.H2D))
        assert time.perf_counter() - t0 < 0.05  # submit does not wait for the copy
        a = torch.randn(128, 128)
        while time.perf_counter() - t0 < 0.2:  # 0.2 s of "compute" while the link is busy
            a = torch.tanh(a @ a)
        engine.wait(job)
        elapsed = time.perf_counter() - t0
        assert 0.28 <= elapsed < 0.46, elapsed  # serialised would be >= 0.51 s
        torch.testing.assert_close(dst, src, rtol=0, atol=0)


def test_worker_errors_surface_and_the_worker_survives(cpu_engine):
    pool = cpu_engine.alloc_device((4, *ROW), torch.float32)
    host = cpu_engine.alloc_host((4, *ROW), torch.float32)
    bad = cpu_engine.submit(TransferJob(pool, host, _idx([9]), _idx([0]), Direction.D2H))  # row 9 of 4
    pool.fill_(3.0)
    good = cpu_engine.submit(TransferJob(pool, host, _idx([1]), _idx([2]), Direction.D2H))
    with pytest.raises(TransferError, match=f"job {bad}") as info:
        cpu_engine.wait(good)  # a later wait reports the earlier failure (FIFO: it ran first)
    assert isinstance(info.value.__cause__, (IndexError, RuntimeError))
    assert torch.all(host[2] == 3.0)  # ...and the good job still ran
    cpu_engine.wait(good)  # reported once
    cpu_engine.submit(TransferJob(pool, host, _idx([0]), _idx([-9]), Direction.D2H))
    with pytest.raises(TransferError):
        cpu_engine.synchronize()
    cpu_engine.synchronize()
    assert cpu_engine.bytes_moved[Direction.D2H] == pool[0].numel() * 4  # failed jobs move nothing


def test_bytes_moved_counts_completed_jobs_per_direction(cpu_engine):
    dev = cpu_engine.alloc_device((6, *ROW), torch.bfloat16)
    host = cpu_engine.alloc_host((6, *ROW), torch.bfloat16)
    row = dev[0].numel() * dev.element_size()
    cpu_engine.submit(TransferJob(dev, host, _idx([0, 1, 2]), _idx([3, 4, 5]), Direction.D2H))
    cpu_engine.submit(TransferJob(host, dev, _idx([3]), _idx([5]), Direction.H2D))
    cpu_engine.submit(TransferJob(dev, dev, _idx([0, 1]), _idx([2, 3]), Direction.D2D))
    cpu_engine.submit(TransferJob(host, dev, _idx([]), _idx([]), Direction.H2D))
    cpu_engine.synchronize()
    assert cpu_engine.bytes_moved == {Direction.D2H: 3 * row, Direction.H2D: row, Direction.D2D: 2 * row}


def test_wait_rejects_unknown_ids_and_closed_engine_rejects_jobs():
    engine = CpuTransferEngine()
    with pytest.raises(ValueError):
        engine.wait(0)
    t = torch.zeros(2, 3)
    job = engine.submit(TransferJob(t, t, _idx([0]), _idx([1]), Direction.D2D))
    engine.close()
    engine.close()  # idempotent
    engine.wait(job)  # close drained the queue
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(TransferJob(t, t, _idx([0]), _idx([1]), Direction.D2D))


def test_dropped_engine_stops_its_worker():
    engine = CpuTransferEngine()
    link = engine._link
    del engine
    gc.collect()
    deadline = time.monotonic() + 2
    while link.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not link.alive


def test_make_transfer_engine():
    engine = make_transfer_engine("cpu", bandwidth_bytes_per_s=1e9)
    assert isinstance(engine, CpuTransferEngine) and engine.bandwidth_bytes_per_s == 1e9
    assert engine.device == torch.device("cpu")
    engine.close()
    with pytest.raises(ValueError, match="unknown transfer backend"):
        make_transfer_engine("tpu")
    with pytest.raises(ValueError, match="cpu backend only"):
        make_transfer_engine("cuda", bandwidth_bytes_per_s=1e9)


def test_cuda_engine_without_gpu_explains_itself():
    try:
        import cupy  # noqa: F401
        have_gpu = torch.cuda.is_available()
    except Exception:
        have_gpu = False
    if have_gpu:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="pip install 'orbitflow-ray\\[gpu\\]'") as info:
        CudaTransferEngine()
    assert str(info.value) == GPU_HELP


def test_contiguous_runs_cover_the_mapping():
    src, dst = _idx([4, 5, 6, 0, 1, 9, 2, 3]), _idx([0, 1, 2, 7, 8, 3, 4, 6])
    runs = contiguous_runs(src, dst)
    assert runs == [(4, 0, 3), (0, 7, 2), (9, 3, 1), (2, 4, 1), (3, 6, 1)]
    assert contiguous_runs(_idx([]), _idx([])) == []


def _cuda_engine_on_host_memory(calls: list) -> CudaTransferEngine:
    """A CUDA engine whose memcpyAsync is memmove on host memory: checks the run/pointer math."""
    def memcpy(dst, src, size, kind, stream):
        calls.append(size)
        ctypes.memmove(dst, src, size)
    cp = SimpleNamespace(cuda=SimpleNamespace(runtime=SimpleNamespace(memcpyAsync=memcpy),
                                              Device=lambda index: contextlib.nullcontext()))
    engine = CudaTransferEngine.__new__(CudaTransferEngine)
    engine._closed = True  # never opened a stream: nothing for __del__ to do
    engine.device, engine._cp, engine._stream = torch.device("cuda", 0), cp, SimpleNamespace(ptr=0)
    return engine


@pytest.mark.parametrize("strided", [False, True])
def test_cuda_run_copies_address_the_right_rows(strided):
    calls: list[int] = []
    engine = _cuda_engine_on_host_memory(calls)
    src = torch.randn(10, 3, 5)[:, :2] if strided else torch.randn(10, 2, 5)  # rows of 2x5 floats
    dst = torch.zeros(12, 2, 5)
    s, d = _idx([4, 5, 6, 0, 9, 2]), _idx([0, 1, 2, 7, 11, 3])
    engine._copy_runs(TransferJob(src, dst, s, d, Direction.H2D))
    expected = torch.zeros(12, 2, 5)
    copy_rows(TransferJob(src.contiguous(), expected, s, d, Direction.H2D))
    torch.testing.assert_close(dst, expected, rtol=0, atol=0)
    assert len(calls) == (6 if strided else 4)  # one memcpy per run when rows are packed


def test_cuda_row_checks_guard_raw_pointers():
    t = torch.zeros(4, 2, 3)
    _check_rows(t, _idx([0, 3]), "src")
    with pytest.raises(IndexError):
        _check_rows(t, _idx([4]), "src")
    with pytest.raises(IndexError):
        _check_rows(t, _idx([-1]), "dst")
    with pytest.raises(ValueError, match="contiguous"):
        _check_rows(t.transpose(1, 2), _idx([0]), "src")


# ---- gather / scatter --------------------------------------------------------------------------
def test_gather_blocks_matches_indexing():
    pool = torch.randn(10, *ROW)
    ids = _idx([7, 2, 2, 9])
    torch.testing.assert_close(gather_blocks(pool, ids), pool[ids], rtol=0, atol=0)
    out = torch.empty(4, *ROW)
    assert gather_blocks(pool, ids, out=out) is out
    torch.testing.assert_close(out, pool[ids], rtol=0, atol=0)
    assert gather_blocks(pool, _idx([])).shape == (0, *ROW)
    with pytest.raises(RuntimeError, match="CuPy gather"):
        gather_blocks(pool, ids, impl="cupy")
    with pytest.raises(ValueError):
        gather_blocks(pool, ids, impl="numba")


def test_scatter_then_gather_roundtrips_tokens():
    block_size, hkv, d = ROW[1], ROW[2], ROW[3]
    pool = torch.zeros(8, *ROW)
    table = _idx([5, 1, 6])  # a request's blocks, in order
    ctx = 10
    k, v = torch.randn(ctx, hkv, d), torch.randn(ctx, hkv, d)
    pos = torch.arange(ctx)
    scatter_rows(pool, table[pos // block_size], pos % block_size, torch.stack([k, v], dim=1))
    for t in range(ctx):  # the layout, token by token
        b, o = int(table[t // block_size]), t % block_size
        assert torch.equal(pool[b, 0, o], k[t]) and torch.equal(pool[b, 1, o], v[t])
    kv = gather_blocks(pool, table)
    torch.testing.assert_close(kv[:, 0].reshape(-1, hkv, d)[:ctx], k, rtol=0, atol=0)
    torch.testing.assert_close(kv[:, 1].reshape(-1, hkv, d)[:ctx], v, rtol=0, atol=0)
    assert pool[[0, 2, 3, 4, 7]].abs().sum() == 0  # nothing else touched
    with pytest.raises(ValueError):
        scatter_rows(pool, table[:2], _idx([0, 1]), torch.zeros(2, hkv, d))


# ---- CUDA (skipped without cupy + GPU) ---------------------------------------------------------
@pytest.fixture
def cuda_engine():
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with CudaTransferEngine(0) as engine:
        yield engine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_random_jobs_match_reference(cuda_engine, dtype):
    dev = cuda_engine.alloc_device((12, *ROW), dtype)
    host = cuda_engine.alloc_host((20, *ROW), dtype)
    assert host.is_pinned() and host.abs().sum() == 0
    dev.copy_(torch.randn(dev.shape, device=dev.device).to(dtype))
    host.copy_(torch.randn(host.shape).to(dtype))
    _run_against_reference(cuda_engine, dev, host, seed=1, count=60)
    assert sum(cuda_engine.bytes_moved.values()) > 0


def test_cuda_write_back_then_prefetch_without_cpu_wait(cuda_engine):
    dev = cuda_engine.alloc_device((8, *ROW), torch.float32)
    host = cuda_engine.alloc_host((8, *ROW), torch.float32)
    staging = cuda_engine.alloc_device((8, *ROW), torch.float32)
    for step in range(5):
        dev.fill_(float(step + 1))  # compute writes on the current stream, before submit
        cuda_engine.submit(TransferJob(dev, host, _idx([1, 2, 3, 6]), _idx([4, 5, 6, 0]), Direction.D2H))
        job = cuda_engine.submit(TransferJob(host, staging, _idx([0, 4]), _idx([0, 1]), Direction.H2D))
        cuda_engine.wait(job)  # stream-ordered: the check below runs after the copy on the GPU
        assert torch.all(staging[:2] == float(step + 1))
    last = cuda_engine.submit(TransferJob(dev, host, _idx([0]), _idx([7]), Direction.D2H))
    cuda_engine.wait_host(last)
    assert torch.all(host[7] == 5.0)


@pytest.mark.parametrize("dtype,row", [(torch.bfloat16, ROW), (torch.float32, (3,)), (torch.uint8, (5,))])
def test_cuda_gather_kernel_matches_torch(dtype, row):
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pool = (torch.randn(64, *row, device="cuda") * 50).to(dtype)
    ids = torch.randint(64, (37,))
    expected = gather_blocks(pool, ids, impl="torch")
    torch.testing.assert_close(gather_blocks(pool, ids, impl="cupy"), expected, rtol=0, atol=0)
    out = torch.empty_like(expected)
    gather_blocks(pool, ids.cuda(), out=out, impl="cupy")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
