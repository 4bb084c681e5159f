"""The CPU transfer engine: both tiers live in RAM, one worker thread plays the copy engine.

The "device" tier is an ordinary RAM region whose size the tier manager budgets. Copies run on a
single worker thread, in submission order, so they overlap with compute on the caller's thread
(numpy's copies release the GIL: `copy_rows`). An optional bandwidth limit makes every
host<->device job take at least nbytes / bandwidth wall seconds, so offloading costs what it would
over a real link.
"""

from __future__ import annotations

import logging
import math
import mmap
import queue
import threading
import time
import weakref

import numpy as np
import torch

from orbitflow_kernels.base import (Direction, TransferEngine, TransferError, TransferJob, check_row_index,
                                    contiguous_runs)

log = logging.getLogger(__name__)
_STOP = None  # queue sentinel: the worker drains everything before it and exits


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeroed memory that costs RAM only where it is written: a private anonymous mapping of its own
    (mmap(2)), whose pages the kernel supplies zeroed on first write (torch.zeros writes every
    page). Not calloc: calloc may hand back a freed heap region it must clear, which writes every
    page, depending on what the process allocated before. A tier budget of gigabytes then reserves
    address space, not memory; each page's first write pays its page fault then. The mapping is
    unmapped when the last tensor viewing it is freed."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)


_MAX_RUNS = 16  # more runs than this in one job: one gather instead of a slice copy per run
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a same-size integer per itemsize


def _bits(t: torch.Tensor) -> np.ndarray:
    """t's memory as a numpy array of same-size integers (numpy has no bfloat16): copies are bit for bit."""
    with torch.inference_mode():  # the engine's buffers may be inference tensors
        return t.view(_BITS[t.element_size()]).numpy()


def copy_rows(job: TransferJob) -> None:
    """The copy: `dst[dst_index] = src[src_index]`, rows gathered first (so src and dst may be the
    same tensor), on the calling thread alone, with numpy, which releases the GIL and starts no
    threads. Not torch's index ops: run from the copy thread, they start an OpenMP team of their
    own, which takes the cores the compute's team is using (on 2 cores, a two-request decode step
    with copies in flight ran its linears 2.7x slower than with the copies made no-ops). Rows that
    run consecutively on both sides (a layer's blocks mostly do: a prefetch of 55-112 blocks came in
    1-5 runs) are copied run by run, each one memcpy, with no temporary: a gather would write every
    byte twice and fault in fresh pages for its buffer. Raises IndexError for a row index outside
    its tensor (numpy would wrap a negative one)."""
    if job.src_index.numel() == 0:
        return
    check_row_index(job.src, job.src_index, "src")
    check_row_index(job.dst, job.dst_index, "dst")
    src, dst = _bits(job.src), _bits(job.dst)
    if not np.may_share_memory(src, dst):  # one tensor: gather first, below
        runs = contiguous_runs(job.src_index, job.dst_index)
        if len(runs) <= _MAX_RUNS:
            for s0, d0, n in runs:
                dst[d0:d0 + n] = src[s0:s0 + n]
            return
    dst[job.dst_index.numpy()] = src[job.src_index.numpy()]  # scattered rows, or one tensor


class _Link:
    """State shared by the engine and its worker. The worker holds only this, never the engine,
    so an engine that is dropped without close() can still be collected (and its thread stopped)."""

    def __init__(self, bandwidth: float | None) -> None:
        self.bandwidth = bandwidth
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.cond = threading.Condition()
        self.completed = 0  # jobs 0 .. completed-1 are done (FIFO, so a prefix)
        self.errors: dict[int, BaseException] = {}
        self.bytes = {d: 0 for d in Direction}
        self.busy = {d: 0.0 for d in Direction}  # seconds the link spent on each direction
        self.stall: dict[int, float] = {}  # seconds callers were blocked in wait(), per tag
        self.busy_until = 0.0  # monotonic time at which the emulated link is next free
        self.alive = True

    def run(self) -> None:
        try:
            while (item := self.jobs.get()) is not _STOP:
                job_id, job = item
                error = None
                started = time.monotonic()
                try:
                    self._execute(job)
                except Exception as exc:  # surfaced by wait()/synchronize(), the thread lives on
                    error = exc
                with self.cond:
                    if error is None:
                        self.bytes[job.direction] += job.nbytes
                        self.busy[job.direction] += time.monotonic() - started
                    else:
                        self.errors[job_id] = error
                    self.completed = job_id + 1
                    self.cond.notify_all()
        finally:
            with self.cond:
                self.alive = False
                self.cond.notify_all()

    def _execute(self, job: TransferJob) -> None:
        start = time.monotonic()
        copy_rows(job)
        if self.bandwidth is None or job.direction == Direction.D2D:
            return
        # A real link is busy for nbytes/bandwidth per job, back to back; the copy itself counts.
        self.busy_until = max(start, self.busy_until) + job.nbytes / self.bandwidth
        remaining = self.busy_until - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)


def _shutdown(link: _Link, thread: threading.Thread) -> None:
    link.jobs.put(_STOP)
    if thread is not threading.current_thread():
        thread.join()


class CpuTransferEngine(TransferEngine):
    """Tiers in RAM, copies on a worker thread (at `bandwidth_bytes_per_s` when set: an emulated
    link). Both tiers are mapped lazily (`lazy_zeros`); with `prefault_device` the device tier is
    written when allocated (as a GPU holds its memory and vLLM zeroes its CPU KV cache at start),
    so no step pays a first-touch page fault there."""

    def __init__(self, bandwidth_bytes_per_s: float | None = None, prefault_device: bool = False) -> None:
        if bandwidth_bytes_per_s is not None and not bandwidth_bytes_per_s > 0:
            raise ValueError(f"bandwidth_bytes_per_s must be positive or None, got {bandwidth_bytes_per_s}")
        self.device = torch.device("cpu")
        self._link = _Link(bandwidth_bytes_per_s)
        self._next_id = 0
        self._closed = False
        self.prefault_device = prefault_device
        thread = threading.Thread(target=self._link.run, name="orbitflow-cpu-transfer", daemon=True)
        thread.start()
        # Runs on close(), on garbage collection and at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _shutdown, self._link, thread)

    @property
    def bandwidth_bytes_per_s(self) -> float | None:
        return self._link.bandwidth

    def alloc_device(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not self.prefault_device:
            return lazy_zeros(shape, dtype)
        start = time.perf_counter()
        out = torch.zeros(shape, dtype=dtype)  # writes every page now
        nbytes = out.numel() * out.element_size()
        if nbytes >= 1 << 30:
            log.info("device tier: %.2f GiB of RAM written at allocation in %.1f s", nbytes / 2**30,
                     time.perf_counter() - start)
        return out

    def alloc_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return lazy_zeros(shape, dtype)

    def submit(self, job: TransferJob) -> int:
        if self._closed:
            raise RuntimeError("submit on a closed CpuTransferEngine")
        for t in (job.src, job.dst, job.src_index, job.dst_index):
            if t.device.type != "cpu":
                raise ValueError(f"CpuTransferEngine copies CPU tensors only, got one on {t.device}")
        job_id = self._next_id
        self._next_id += 1
        self._link.jobs.put((job_id, job))
        return job_id

    def wait(self, job_id: int, tag: int = -1) -> None:
        """Block until the job (and, FIFO, every job before it) is done; the time blocked counts
        in stall_seconds[tag]."""
        if not 0 <= job_id < self._next_id:
            raise ValueError(f"unknown job id {job_id} (submitted so far: {self._next_id})")
        link = self._link
        t0 = time.perf_counter()
        with link.cond:
            link.cond.wait_for(lambda: link.completed > job_id or not link.alive)
            link.stall[tag] = link.stall.get(tag, 0.0) + time.perf_counter() - t0
            if link.completed <= job_id:
                raise TransferError(f"transfer worker stopped before job {job_id} ran")
            failed = sorted(i for i in link.errors if i <= job_id)
            errors = [link.errors.pop(i) for i in failed]
        if errors:
            more = f" (and jobs {failed[1:]})" if len(failed) > 1 else ""
            raise TransferError(f"transfer job {failed[0]} failed{more}: {errors[0]!r}") from errors[0]

    def synchronize(self) -> None:
        if self._next_id:
            self.wait(self._next_id - 1)

    @property
    def bytes_moved(self) -> dict[Direction, int]:
        with self._link.cond:
            return dict(self._link.bytes)

    @property
    def busy_seconds(self) -> dict[Direction, float]:
        """Link time spent per direction (completed jobs): the cost model's effective bandwidth."""
        with self._link.cond:
            return dict(self._link.busy)

    @property
    def stall_seconds(self) -> dict[int, float]:
        """Seconds callers were blocked in wait() per tag, by the caller's clock (perf_counter)."""
        with self._link.cond:
            return dict(self._link.stall)

    def close(self) -> None:
        """Finish the queued jobs, then stop the worker. Idempotent; errors stay for synchronize()."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> CpuTransferEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
