"""Transfer engines, and gather/scatter on the head-major KV pool.

    PYTHONPATH=.:kernels .venv/bin/python -m pytest tests/test_transfer.py -q

CPU tests always run; CUDA tests need cupy and a GPU and are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import shutil
import subprocess
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orbitflow_kernels import (CpuTransferEngine, CudaTransferEngine, Direction, TransferError, TransferJob,
                               gather_kv, make_transfer_engine, scatter_tokens)
from orbitflow_kernels import gather as gather_mod
from orbitflow_kernels.cpu import copy_rows
from orbitflow_kernels.cuda import GPU_HELP, _check_rows, conflicts, contiguous_runs
from kv_probe import resident_pages

ROW = (2, 4, 2, 8)  # [2, block_size, Hkv, D]: a small KV block


def _idx(values) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.int64)


def _reference_copy(job: TransferJob) -> None:
    """torch's `dst[dst_index] = src[src_index]`, rows gathered first: what every engine's copy must do."""
    with torch.inference_mode():
        job.dst.index_copy_(0, job.dst_index, job.src.index_select(0, job.src_index))


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
        _reference_copy(TransferJob(ref_of[id(src)], ref_of[id(dst)], s, d, direction))
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


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 23), st.integers(1, 6)), min_size=1, max_size=24),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.booleans(), st.randoms())
def test_copy_rows_matches_torch_index_copy(spans, dtype, same_tensor, rnd):
    """Row mappings made of consecutive runs (slice copies), of more runs than `_MAX_RUNS` (one
    gather), and within one tensor (gathered first): bit for bit torch's index_select/index_copy_."""
    src = torch.randn(32, *ROW).to(dtype)
    dst = src if same_tensor else torch.randn(30, *ROW).to(dtype)
    s = _idx([min(a + k, 31) for a, n in spans for k in range(n)])
    d = _idx(rnd.sample(range(dst.shape[0]), min(len(s), dst.shape[0])))
    if rnd.random() < 0.5:  # a consecutive destination, as a prefetch into a staging slot has
        d = torch.arange(len(d))
    s = s[:len(d)]
    expected_src, expected = src.clone(), dst.clone()
    _reference_copy(TransferJob(expected_src, expected_src if same_tensor else expected, s, d, Direction.H2D))
    copy_rows(TransferJob(src, dst, s, d, Direction.H2D))
    torch.testing.assert_close(dst.view(torch.int16), (expected_src if same_tensor else expected).view(torch.int16),
                               rtol=0, atol=0)


def test_copy_rows_refuses_rows_outside_the_tensor():
    src, dst = torch.zeros(4, *ROW), torch.zeros(4, *ROW)
    for s, d in (([0, -1], [0, 1]), ([0, 4], [0, 1]), ([0, 1], [2, 4])):
        with pytest.raises(IndexError, match="out of range"):
            copy_rows(TransferJob(src, dst, _idx(s), _idx(d), Direction.H2D))


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
    engine.device, engine._cp = torch.device("cuda", 0), cp
    return engine


@pytest.mark.parametrize("strided", [False, True])
def test_cuda_run_copies_address_the_right_rows(strided):
    calls: list[int] = []
    engine = _cuda_engine_on_host_memory(calls)
    src = torch.randn(10, 3, 5)[:, :2] if strided else torch.randn(10, 2, 5)  # rows of 2x5 floats
    dst = torch.zeros(12, 2, 5)
    s, d = _idx([4, 5, 6, 0, 9, 2]), _idx([0, 1, 2, 7, 11, 3])
    engine._copy_runs(TransferJob(src, dst, s, d, Direction.H2D), 0)
    expected = torch.zeros(12, 2, 5)
    _reference_copy(TransferJob(src.contiguous(), expected, s, d, Direction.H2D))
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


@pytest.mark.parametrize("prefault", [True, False])
def test_cpu_device_tier_is_written_at_allocation_when_prefaulted(prefault):
    """prefault_device: the device tier's pages are all in RAM when it is allocated (as a GPU holds
    its memory and vLLM zeroes its CPU KV cache), so no step pays their first-touch faults; without it
    (the default), and the host tier always, no page until written. Both read as zeros."""
    shape = (2048, 2, 3, 16, 64)  # 48 MiB
    # written regions of that size, freed at once: an allocator recycling them would hand back written pages
    np.ones(math.prod(shape) * 4, np.uint8), torch.ones(shape)
    with CpuTransferEngine(prefault_device=prefault) as engine:
        dev, host = engine.alloc_device(shape, torch.float32), engine.alloc_host(shape, torch.float32)
        dev_in, dev_pages = resident_pages(dev)
        host_in, host_pages = resident_pages(host)
        assert dev_in == (dev_pages if prefault else 0) and host_in == 0
        assert not dev.any() and not host.any()
    with make_transfer_engine("cpu") as default, make_transfer_engine("cpu", prefault_device=True) as eager:
        assert eager.prefault_device and not default.prefault_device


# ---- gather / scatter on the head-major pool [num_blocks, 2, Hkv, bs, D] -------------------------
def _random_pool(num_blocks: int, hkv: int, bs: int, d: int, dtype: torch.dtype, seed: int = 0,
                 device: str = "cpu") -> torch.Tensor:
    """Nonzero entries everywhere, so a zero in a gather result means a zero-filled slot."""
    gen = torch.Generator().manual_seed(seed)
    vals = torch.randint(1, 100, (num_blocks, 2, hkv, bs, d), generator=gen)
    if dtype.is_floating_point:
        vals = vals + torch.rand(vals.shape, generator=gen)
    return vals.to(dtype).to(device)


def _naive_kv(pool: torch.Tensor, ids, length: int) -> torch.Tensor:
    """Token by token: out[kv, h, t] = pool[ids[t // bs], kv, h, t % bs]."""
    bs = pool.shape[3]
    ids = [int(i) for i in ids]
    out = torch.empty((2, pool.shape[2], length, pool.shape[4]), dtype=pool.dtype)
    for t in range(length):
        out[:, :, t] = pool[ids[t // bs], :, :, t % bs]
    return out


# (num_blocks, hkv, bs, d, dtype, ids, length): repeated, unordered ids, lengths off the block grid
GATHER_CASES = [
    (9, 2, 4, 8, torch.float32, [7, 2, 2, 8, 0], 18),
    (6, 3, 3, 5, torch.bfloat16, [5, 1, 4, 1], 10),
    (5, 1, 1, 4, torch.float16, [3, 3, 0, 4, 2], 5),
    (7, 2, 16, 2, torch.uint8, [6, 0], 17),
    (4, 2, 5, 3, torch.int64, [2, 3, 1, 0, 2, 3], 30),
]


@pytest.mark.parametrize("num_blocks,hkv,bs,d,dtype,ids,length", GATHER_CASES)
def test_gather_kv_matches_token_loop_and_is_sdpa_ready(num_blocks, hkv, bs, d, dtype, ids, length):
    pool = _random_pool(num_blocks, hkv, bs, d, dtype)
    expected = _naive_kv(pool, ids, length)
    for impl in ("auto", "torch"):
        kv = gather_kv(pool, _idx(ids), length, impl=impl)
        assert kv.shape == (2, hkv, length, d) and kv.dtype == dtype
        torch.testing.assert_close(kv, expected, rtol=0, atol=0)
        # a view of one contiguous [2, Hkv, n * bs, D] buffer: kv[0] / kv[1] go to SDPA as is
        assert kv.stride() == (hkv * len(ids) * bs * d, len(ids) * bs * d, d, 1)
    for h in range(hkv):
        for t in (0, length // 2, length - 1):
            assert torch.equal(kv[0, h, t], pool[ids[t // bs], 0, h, t % bs])
            assert torch.equal(kv[1, h, t], pool[ids[t // bs], 1, h, t % bs])
    full = gather_kv(pool, ids, len(ids) * bs)  # a list works too; full length is contiguous
    assert full.is_contiguous()
    torch.testing.assert_close(full[:, :, :length], expected, rtol=0, atol=0)


def test_gather_kv_edges_and_errors():
    pool = _random_pool(4, 2, 3, 4, torch.float32)
    assert gather_kv(pool, _idx([]), 0).shape == (2, 2, 0, 4)
    assert gather_kv(pool, _idx([1, 2]), 0).shape == (2, 2, 0, 4)
    with pytest.raises(ValueError, match="length"):
        gather_kv(pool, _idx([1, 2]), 7)  # 2 blocks of 3
    with pytest.raises(ValueError, match="length"):
        gather_kv(pool, _idx([1]), -1)
    with pytest.raises(ValueError, match="num_blocks"):
        gather_kv(pool[:, 0], _idx([1]), 1)
    with pytest.raises(ValueError, match="impl"):
        gather_kv(pool, _idx([1]), 1, impl="numba")
    with pytest.raises(RuntimeError, match="CuPy gather"):
        gather_kv(pool, _idx([1]), 1, impl="cupy")  # a CPU pool


def _pool_at(shape, dtype, offset_bytes: int) -> torch.Tensor:
    """A contiguous pool whose data starts `offset_bytes` past a 64-byte boundary."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = torch.zeros(nbytes + 128, dtype=torch.uint8)
    start = (-buf.data_ptr()) % 64 + offset_bytes
    pool = buf[start:start + nbytes].view(dtype).view(shape)
    pool.copy_(_random_pool(shape[0], shape[2], shape[3], shape[4], dtype))
    assert pool.data_ptr() % 64 == offset_bytes
    return pool


# (hkv, bs, d, dtype, pool offset in bytes, copy width the launch must pick)
KERNEL_CASES = [
    (2, 3, 8, torch.float32, 0, 16),   # 96-byte slabs
    (3, 5, 4, torch.float16, 0, 8),    # 40-byte slabs
    (2, 3, 2, torch.bfloat16, 0, 4),   # 12-byte slabs
    (2, 3, 5, torch.uint8, 0, 1),      # 15-byte slabs
    (2, 4, 4, torch.float32, 4, 4),    # 64-byte slabs, pool only 4-byte aligned
    (1, 16, 8, torch.bfloat16, 8, 8),  # 256-byte slabs, pool 8-byte aligned: 32 words per slab
]


_HOST_SHIM = r"""
#define __global__
struct Dim3 { long long x; };
static Dim3 blockIdx, gridDim, threadIdx, blockDim;
%s
// Runs every (block, thread) of the launch in turn: the kernel has no inter-thread communication.
extern "C" void launch(int width, long long grid, long long threads, const void* pool, void* out,
                       const long long* ids, long long n, long long kvh, long long slab_words,
                       long long num_blocks) {
    gridDim.x = grid; blockDim.x = threads;
    for (blockIdx.x = 0; blockIdx.x < grid; ++blockIdx.x)
        for (threadIdx.x = 0; threadIdx.x < threads; ++threadIdx.x) switch (width) {
            case 16: gather_kv_16((const Word16*)pool, (Word16*)out, ids, n, kvh, slab_words, num_blocks); break;
            case 8: gather_kv_8((const Word8*)pool, (Word8*)out, ids, n, kvh, slab_words, num_blocks); break;
            case 4: gather_kv_4((const Word4*)pool, (Word4*)out, ids, n, kvh, slab_words, num_blocks); break;
            default: gather_kv_1((const Word1*)pool, (Word1*)out, ids, n, kvh, slab_words, num_blocks);
        }
}
"""


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    """The CUDA source itself, built for the host with a shim for the CUDA built-ins."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    tmp = tmp_path_factory.mktemp("gather_kernel")
    (tmp / "k.cpp").write_text(_HOST_SHIM % gather_mod._KERNEL_SRC)
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-o",
                    str(tmp / "k.so"), str(tmp / "k.cpp")], check=True, capture_output=True)
    lib = ctypes.CDLL(str(tmp / "k.so"))
    i64, ptr = ctypes.c_longlong, ctypes.c_void_p
    lib.launch.argtypes = [ctypes.c_int, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64]
    return lambda width, grid, threads, args: lib.launch(width, grid, threads, *(int(a) for a in args))


@pytest.mark.parametrize("hkv,bs,d,dtype,offset,width", KERNEL_CASES)
@pytest.mark.parametrize("small_launch", [False, True])
@pytest.mark.parametrize("runner", ["numpy", "host_cxx"])
def test_kernel_slab_mapping_on_cpu(request, monkeypatch, runner, hkv, bs, d, dtype, offset, width,
                                    small_launch):
    """The kernel run on the CPU through the same raw pointers and launch arguments, either as its
    numpy mirror or as its own source compiled for the host: width choice, grid-stride over slabs,
    thread-stride over words, the slab -> SDPA offset arithmetic and the zero-fill."""
    run = gather_mod._emulate_launch if runner == "numpy" else request.getfixturevalue("host_kernel")
    if small_launch:  # force both stride loops to wrap
        monkeypatch.setattr(gather_mod, "_MAX_GRID", 5)
        monkeypatch.setattr(gather_mod, "_MAX_THREADS", 2)
    pool = _pool_at((7, 2, hkv, bs, d), dtype, offset)
    ids = [4, 0, 6, 0, 2]
    launches = []

    def launch(w, grid, threads, args):
        launches.append((w, grid, threads))
        run(w, grid, threads, args)

    length = len(ids) * bs - 1
    kv = gather_mod._gather_slabs(pool, _idx(ids), length, launch)
    torch.testing.assert_close(kv, _naive_kv(pool, ids, length), rtol=0, atol=0)
    assert kv.stride() == (hkv * len(ids) * bs * d, len(ids) * bs * d, d, 1)
    slabs = len(ids) * 2 * hkv
    slab_words = bs * d * pool.element_size() // width
    threads = 2 if small_launch else min(256, 32 * math.ceil(slab_words / 32))
    assert launches == [(width, min(slabs, 5) if small_launch else slabs, threads)]
    # out-of-range ids (past the end, negative) zero-fill their slots and read nothing outside
    kv = gather_mod._gather_slabs(pool, _idx([1, 7, -1, 3]), 4 * bs, launch)
    for j, bid in enumerate([1, 7, -1, 3]):
        got = kv[:, :, j * bs:(j + 1) * bs]
        assert torch.equal(got, pool[bid]) if bid in (1, 3) else not got.any()
    assert gather_mod._gather_slabs(pool, _idx([]), 0, launch).shape == (2, hkv, 0, d)
    assert len(launches) == 2  # nothing launched for an empty gather


@pytest.fixture
def fake_kernel(monkeypatch):
    """Route gather_kv's kernel path on a CPU pool through the emulated launch."""
    monkeypatch.setattr(gather_mod, "_broken", [])
    monkeypatch.setattr(gather_mod, "_kernel_usable", lambda pool: pool.is_contiguous())
    monkeypatch.setattr(gather_mod, "_launch_cupy",
                        lambda kernels, device, *config: gather_mod._emulate_launch(*config))
    return monkeypatch


def test_gather_kv_auto_takes_the_kernel_and_falls_back_once(fake_kernel):
    pool = _random_pool(6, 2, 4, 8, torch.bfloat16)
    ids, length = _idx([5, 0, 5, 3]), 13
    expected = _naive_kv(pool, ids, length)
    built = []
    fake_kernel.setattr(gather_mod, "_kernels", lambda index: built.append(index) or {})
    for impl in ("auto", "cupy"):
        torch.testing.assert_close(gather_kv(pool, ids, length, impl=impl), expected, rtol=0, atol=0)
    assert len(built) == 2
    # a non-contiguous pool is not the kernel's: auto takes torch, cupy refuses
    strided = torch.cat([pool, pool], dim=4)[..., :8]
    torch.testing.assert_close(gather_kv(strided, ids, length), expected, rtol=0, atol=0)
    assert len(built) == 2
    with pytest.raises(RuntimeError, match="contiguous"):
        gather_kv(strided, ids, length, impl="cupy")

    def no_nvrtc(index):
        raise RuntimeError("nvrtc: no toolchain")
    fake_kernel.setattr(gather_mod, "_kernels", no_nvrtc)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        torch.testing.assert_close(gather_kv(pool, ids, length), expected, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: auto now stays on torch quietly
        torch.testing.assert_close(gather_kv(pool, ids, length), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no toolchain"):
        gather_kv(pool, ids, length, impl="cupy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_tokens_then_gather_roundtrips(dtype):
    bs, hkv, d = 4, 3, 8
    pool = torch.zeros(8, 2, hkv, bs, d, dtype=dtype)
    table = _idx([5, 1, 6])  # a request's blocks, in order
    ctx = 10
    k, v = torch.randn(ctx, hkv, d).to(dtype), torch.randn(ctx, hkv, d).to(dtype)
    # two steps: a prefill of 7 tokens, then 3 more, as the engine writes them
    for lo, hi in ((0, 7), (7, ctx)):
        pos = torch.arange(lo, hi)
        scatter_tokens(pool, table[pos // bs], pos % bs, torch.stack([k[lo:hi], v[lo:hi]], 1).float())
    for t in range(ctx):  # the layout, token by token
        b, o = int(table[t // bs]), t % bs
        assert torch.equal(pool[b, 0, :, o], k[t]) and torch.equal(pool[b, 1, :, o], v[t])
    kv = gather_kv(pool, table, ctx)
    torch.testing.assert_close(kv[0], k.transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(kv[1], v.transpose(0, 1), rtol=0, atol=0)
    assert not pool[[0, 2, 3, 4, 7]].any() and not pool[6, :, :, 2:].any()  # nothing else touched
    with pytest.raises(ValueError, match="values must be"):
        scatter_tokens(pool, table[:2], _idx([0, 1]), torch.zeros(2, hkv, d))
    with pytest.raises(ValueError, match="offsets"):
        scatter_tokens(pool, table[:2], _idx([0]), torch.zeros(2, 2, hkv, d))


def _store_step_seqs(tables, starts, lens, tracker):
    """The plan's seqs as the scheduler makes them: live tables and what changed since last sent."""
    from orbitflow_ray.sampling_params import SamplingParams
    from orbitflow_ray.kv.plan import ScheduledSeq
    return [ScheduledSeq(f"r{i}", [0] * n, start, True, table, SamplingParams(), 0,
                         table_deltas=tracker.deltas(f"r{i}", table))
            for i, (table, start, n) in enumerate(zip(tables, starts, lens))]


def test_kv_store_step_indexing_matches_per_token_reference():
    """KVStore.write scatters all seqs of a layer at once and read gathers each seq from the tensor
    its layer lives in this step (device pool or staging slot): across steps of prefills, chunks
    and decodes with device-only, mixed and host-only layers, every read is exactly the tokens
    written so far, and host layers are written back."""
    from orbitflow_ray.kv.blocks import LayerKV, Tier
    from orbitflow_ray.kv.store import KVStore
    from orbitflow_ray.sched.table_deltas import TableTracker

    bs, hkv, d, layers = 4, 2, 8, 3
    tracker = TableTracker()
    engine = CpuTransferEngine()
    store = KVStore(engine, 64, 64, bs, hkv, d, torch.float32, prefetch_depth=1)
    gen = torch.Generator().manual_seed(0)
    tiers = [[Tier.DEVICE] * 3, [Tier.DEVICE, Tier.HOST, Tier.DEVICE], [Tier.HOST] * 3]  # [layer][seq]
    free = {t: torch.randperm(64, generator=gen).tolist() for t in Tier}
    tables = [[LayerKV(tiers[l][i], [free[tiers[l][i]].pop() for _ in range(5)]) for l in range(layers)]
              for i in range(3)]
    history = {(i, l): torch.zeros(0, 2, hkv, d) for i in range(3) for l in range(layers)}
    steps = [([0, 0, 0], [7, 1, 5]), ([7, 1, 5], [1, 9, 3]), ([8, 10, 8], [1, 1, 1])]  # (starts, lens)
    for starts, lens in steps:
        seqs = _store_step_seqs(tables, starts, lens, tracker)
        store.begin_step(seqs)
        for l in range(layers):
            store.before_layer(l)
            kv = torch.randn(sum(lens), 2, hkv, d, generator=gen)
            store.write(l, kv[:, 0], kv[:, 1])
            a = 0
            for i, n in enumerate(lens):
                history[i, l] = torch.cat([history[i, l], kv[a:a + n]])
                keys, values = store.read(l, i, kv[a:a + n, 0], kv[a:a + n, 1])
                want = history[i, l].permute(1, 2, 0, 3)  # [2, Hkv, ctx + n, D]
                assert torch.equal(keys[0], want[0]) and torch.equal(values[0], want[1])
                a += n
            store.after_layer(l)
    engine.synchronize()
    for (i, l), want in history.items():
        lk = tables[i][l]
        got = gather_kv(store.pools[lk.tier], _idx(lk.blocks), want.shape[0])
        assert torch.equal(got, want.permute(1, 2, 0, 3))


def test_kv_store_moves_into_device_overlap_until_their_layer():
    """Host -> device moves are in flight after apply_moves and waited for only at their layer;
    device -> host moves are done when apply_moves returns (their blocks may be reused at once)."""
    from orbitflow_ray.kv.blocks import MoveOp, Tier
    from orbitflow_ray.kv.store import KVStore

    with CpuTransferEngine(bandwidth_bytes_per_s=2e6) as engine:  # 256 KiB takes ~0.13 s
        store = KVStore(engine, 64, 64, 16, 2, 64, torch.float32, prefetch_depth=1)  # 16 KiB blocks
        store.pools[Tier.HOST][:16] = torch.randn(16, *store.row_shape)
        store.pools[Tier.DEVICE][40:44] = torch.randn(4, *store.row_shape)
        out = MoveOp("r", 0, Tier.DEVICE, (40, 41, 42, 43), Tier.HOST, (20, 21, 22, 23))
        into = MoveOp("r", 2, Tier.HOST, tuple(range(16)), Tier.DEVICE, tuple(range(16)))
        want_out = store.pools[Tier.DEVICE][40:44].clone()
        store.apply_moves([into, out])
        assert torch.equal(store.pools[Tier.HOST][20:24], want_out)  # waited for
        assert engine.bytes_moved[Direction.H2D] == 0 and 2 in store._move_jobs  # still in flight
        store.before_layer(0)
        store.before_layer(1)
        assert 2 in store._move_jobs
        store.before_layer(2)
        assert not store._move_jobs
        assert torch.equal(store.pools[Tier.DEVICE][:16], store.pools[Tier.HOST][:16])
        stalls = engine.stall_seconds  # by the layer each wait named; -1: the move out, waited at once
        assert set(stalls) <= {-1, 2} and stalls[2] > 0
        assert store.last_stall_s == pytest.approx(sum(stalls.values()))


def test_cpu_engine_stall_and_busy_seconds_agree_with_the_callers_clock():
    """A wait's stall is the time the caller was blocked in it (by the caller's clock, under its
    tag); busy time counts the link's share of each completed job, per direction."""
    with CpuTransferEngine(bandwidth_bytes_per_s=4e6) as engine:  # 64 KiB takes ~16 ms
        src, dst = torch.randn(16, 1024), torch.zeros(16, 1024)
        job = engine.submit(TransferJob(src, dst, torch.arange(16), torch.arange(16), Direction.H2D))
        t0 = time.perf_counter()
        engine.wait(job, tag=3)
        blocked = time.perf_counter() - t0
        assert set(engine.stall_seconds) == {3} and 0 < engine.stall_seconds[3] <= blocked
        assert engine.busy_seconds[Direction.H2D] > 0 and engine.busy_seconds[Direction.D2H] == 0
        before = engine.stall_seconds[3]
        back = engine.submit(TransferJob(dst, src, torch.arange(16), torch.arange(16), Direction.D2H))
        engine.wait(back)  # untagged: -1
        assert engine.stall_seconds[3] == before and engine.stall_seconds[-1] > 0
        assert engine.busy_seconds[Direction.D2H] > 0
        torch.testing.assert_close(src, dst, rtol=0, atol=0)


def test_copy_jobs_conflict_only_on_shared_rows_with_a_writer():
    """What orders jobs across the CUDA engine's two streams (pure tensor logic, checked on CPU)."""
    host, dev, slot = torch.zeros(10, 4), torch.zeros(8, 4), torch.zeros(4, 4)

    def job(src, dst, s, d, direction):
        return TransferJob(src, dst, _idx(s), _idx(d), direction)
    write_back = job(slot, host, [0, 1], [4, 5], Direction.D2H)
    assert conflicts(write_back, job(host, slot, [5, 9], [2, 3], Direction.H2D))  # reads what it writes
    assert conflicts(write_back, job(host, slot, [0], [1], Direction.H2D))  # overwrites slot rows it reads
    assert not conflicts(write_back, job(host, slot, [0, 2], [2, 3], Direction.H2D))  # other rows
    assert not conflicts(job(host, dev, [1], [0], Direction.H2D), job(host, slot, [1], [0], Direction.H2D))  # both read
    assert not conflicts(write_back, job(torch.zeros(10, 4), dev, [4], [0], Direction.H2D))  # other memory
    assert conflicts(write_back, job(host[6:], dev, [0], [0], Direction.H2D))  # another view: assumed to overlap
    assert not conflicts(write_back, job(host, dev, [], [], Direction.H2D))  # an empty job touches nothing


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


def test_cuda_wait_covers_earlier_jobs_on_both_streams_and_is_timed(cuda_engine):
    """wait(job) also covers every job submitted before it, on the other direction's stream too;
    the compute time a wait holds and each direction's link time come from CUDA events."""
    dev = cuda_engine.alloc_device((8, *ROW), torch.float32)
    host = cuda_engine.alloc_host((8, *ROW), torch.float32)
    dev.copy_(torch.randn(dev.shape, device=dev.device))
    cuda_engine.submit(TransferJob(dev, host, _idx([0, 1, 2]), _idx([0, 1, 2]), Direction.D2H))
    into = cuda_engine.submit(TransferJob(host, dev, _idx([6]), _idx([7]), Direction.H2D))  # other rows
    cuda_engine.wait_host(into)  # covers the D2H job before it (its own stream)
    torch.testing.assert_close(host[:3], dev[:3].cpu(), rtol=0, atol=0)
    job = cuda_engine.submit(TransferJob(host, dev, _idx([0, 1, 2]), _idx([3, 4, 5]), Direction.H2D))
    cuda_engine.wait(job, tag=7)
    torch.cuda.synchronize()
    assert 7 in cuda_engine.stall_seconds and cuda_engine.stall_seconds[7] >= 0
    assert cuda_engine.busy_seconds[Direction.H2D] > 0 and cuda_engine.busy_seconds[Direction.D2H] > 0
    assert torch.all(host[7] == 5.0)


@pytest.mark.parametrize("hkv,bs,d,dtype", [(8, 16, 128, torch.bfloat16), (2, 3, 8, torch.float32),
                                              (3, 5, 4, torch.float16), (2, 3, 5, torch.uint8)])
def test_cuda_gather_kernel_matches_torch(hkv, bs, d, dtype):
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    layers = _random_pool(2 * 64, hkv, bs, d, dtype, seed=3, device="cuda").view(2, 64, 2, hkv, bs, d)
    pool = layers[1]  # a contiguous view at an offset, like one layer of a stacked pool
    ids = torch.randint(64, (37,))
    ids[5] = ids[9]  # repeated
    length = 37 * bs - 2
    expected = gather_kv(pool, ids, length, impl="torch")
    torch.testing.assert_close(expected.cpu(), _naive_kv(pool.cpu(), ids, length), rtol=0, atol=0)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # launched on the current stream, whichever it is
        side.wait_stream(torch.cuda.default_stream())
        got = gather_kv(pool, ids.cuda(), length, impl="cupy")
        auto = gather_kv(pool, ids, length)
    torch.cuda.synchronize()
    assert got.stride() == expected.stride()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(auto, expected, rtol=0, atol=0)
    assert not gather_mod._broken
    bad = gather_kv(pool, _idx([1, 64, -1, 2]), 4 * bs, impl="cupy")  # out of range: zero-filled
    torch.testing.assert_close(bad[:, :, :bs], pool[1], rtol=0, atol=0)
    torch.testing.assert_close(bad[:, :, 3 * bs:], pool[2], rtol=0, atol=0)
    assert not bad[:, :, bs:3 * bs].any()


def test_table_deltas_send_appends_and_rewrites_only():
    """The plan carries what changed in a table since it was last sent: appended blocks, or the
    whole layer when the tier manager rewrote it (a move); the executor's tensor copy follows."""
    from orbitflow_ray.kv.block_table import BlockTables
    from orbitflow_ray.kv.blocks import LayerKV, Tier
    from orbitflow_ray.sampling_params import SamplingParams
    from orbitflow_ray.kv.plan import ScheduledSeq, TableDelta
    from orbitflow_ray.sched.table_deltas import TableTracker

    tracker, tables = TableTracker(), BlockTables(2, torch.device("cpu"), rows=1, blocks=1)
    table = [LayerKV(Tier.DEVICE, [4, 9]), LayerKV(Tier.HOST, [3])]

    def send(rid="a"):
        seq = ScheduledSeq(rid, [0], 0, True, table, SamplingParams(), 0,
                           table_deltas=tracker.deltas(rid, table))
        row = tables.update([seq])[0]
        for layer, lk in enumerate(table):
            assert tables.ids[layer, row, :len(lk.blocks)].tolist() == lk.blocks
            assert bool(tables.host[layer, row]) == (lk.tier == Tier.HOST)
        return seq.table_deltas

    assert send() == [TableDelta(0, Tier.DEVICE, 0, (4, 9)), TableDelta(1, Tier.HOST, 0, (3,))]
    assert send() == []
    table[0].blocks.append(11)
    table[1].blocks.append(5)
    assert send() == [TableDelta(0, Tier.DEVICE, 2, (11,)), TableDelta(1, Tier.HOST, 1, (5,))]
    table[1] = LayerKV(Tier.DEVICE, [7, 8])  # moved to device: a new list
    assert send() == [TableDelta(1, Tier.DEVICE, 0, (7, 8))]
    with pytest.raises(RuntimeError, match="whole table"):  # a new id must come with all of it
        table[0].blocks.append(12)
        tables.update([ScheduledSeq("b", [0], 0, True, table, SamplingParams(), 0,
                                    table_deltas=[TableDelta(0, Tier.DEVICE, 3, (12,))])])
    tracker.forget(["a"])
    tables.forget(["a"])
    assert len(send("a")) == 2  # a reused id starts over
