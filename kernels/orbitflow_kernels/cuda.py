"""The CUDA transfer engine: an HBM device tier, a CuPy-pinned host tier, one copy stream.

Design. Every job is issued at submit() as DMA on one dedicated non-blocking CuPy stream: one
`cudaMemcpyAsync` per run of rows that are consecutive on both sides (vLLM's swap_blocks copies
block by block the same way; KV rows are whole blocks, tens of KB, so per-run DMA runs near link
speed). Host rows are written or read in place, with no host-side gather into a staging buffer and
no host-side scatter afterwards, so:
  * a D2H job is complete, host rows included, exactly when its event completes: there is no
    completion step to run on a CPU thread, and nothing for wait() to poll;
  * FIFO order is the stream's order, so a D2H write followed by an H2D read of the same host rows
    needs no CPU blocking at all;
  * submit() never touches payload bytes on the CPU; its cost is one API call per run.
D2D jobs are two torch index kernels on the copy stream (one launch pair, whatever the row count).
Before its copies, each job makes the copy stream wait for the caller's current (compute) stream, so
it reads what compute wrote before submit and never overwrites rows that compute still reads.
wait(job) makes the compute stream wait on the job's event: the CPU does not block. A CPU reader of
host rows written by D2H must call `wait_host(job)` or `synchronize()` first. The engine keeps each
job's tensors alive until its event has completed, so callers may drop them right after submit.
Host memory comes from CuPy's process-wide pinned pool: a pooled block is released to the pool only
when its tensor dies, and the pool itself never dies before the process does.
Each job's copies sit between two timing events, so `busy_seconds` reports the link time each
direction took (the cost model's effective bandwidth), as the CPU engine's does.
Not thread-safe: one caller thread (the model runner) submits and waits.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from orbitflow_kernels.base import Direction, TransferEngine, TransferJob

GPU_HELP = ("CUDA transfer engine needs CuPy for your CUDA major version and a GPU: "
            "pip install 'orbitflow-ray[gpu]' (cupy-cuda12x) or 'orbitflow-ray[gpu-cu13]' (cupy-cuda13x)")
_KIND = {Direction.H2D: 1, Direction.D2H: 2}  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost


def _load_cupy():
    try:
        import cupy
        if not torch.cuda.is_available() or cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device visible to torch and CuPy")
    except Exception as exc:  # ImportError, a CPU-only torch, a driver without devices
        raise RuntimeError(GPU_HELP) from exc
    return cupy


def contiguous_runs(src_index: torch.Tensor, dst_index: torch.Tensor) -> list[tuple[int, int, int]]:
    """Split a row mapping into (src_start, dst_start, length) runs, in job order, where both
    sides advance by exactly one row: each run is one memcpy."""
    s = src_index.reshape(-1).to("cpu", torch.int64)
    d = dst_index.reshape(-1).to("cpu", torch.int64)
    n = s.numel()
    if n == 0:
        return []
    brk = torch.ones(n, dtype=torch.bool)
    brk[1:] = (s[1:] - s[:-1] != 1) | (d[1:] - d[:-1] != 1)
    starts = brk.nonzero().flatten()
    lengths = torch.diff(starts, append=torch.tensor([n]))
    return list(zip(s[starts].tolist(), d[starts].tolist(), lengths.tolist()))


def _check_rows(t: torch.Tensor, index: torch.Tensor, what: str) -> None:
    """Raw-pointer copies have no bounds checks of their own: check here, at submit."""
    if t.dim() == 0 or (t.shape[0] and not t[0].is_contiguous()):
        raise ValueError(f"{what}: rows must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= t.shape[0]):
        raise IndexError(f"{what}: row index out of range [0, {t.shape[0]}): "
                         f"min {int(index.min())}, max {int(index.max())}")


@dataclass(slots=True)
class _Pending:
    job_id: int
    start: torch.cuda.Event  # recorded once the copy stream reaches the job: busy = start -> event
    event: torch.cuda.Event
    job: TransferJob  # held so its tensors outlive the copy


class CudaTransferEngine(TransferEngine):
    def __init__(self, device: int | str | torch.device = 0) -> None:
        self._closed = True  # until construction succeeds (keeps __del__ quiet on failure)
        cp = _load_cupy()
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"CudaTransferEngine needs a CUDA device, got {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self._cp = cp
        with cp.cuda.Device(dev.index):
            self._stream = cp.cuda.Stream(non_blocking=True)
        self._torch_stream = torch.cuda.ExternalStream(self._stream.ptr, device=dev)
        self._pinned = cp.get_default_pinned_memory_pool()
        self._inflight: deque[_Pending] = deque()
        self._next_id = 0
        self._bytes = {d: 0 for d in Direction}
        self._busy = {d: 0.0 for d in Direction}
        self._closed = False

    # ---- memory --------------------------------------------------------------------------------
    def alloc_device(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def alloc_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.zeros(shape, dtype=dtype)
        mem = self._pinned.malloc(nbytes)  # cudaHostAlloc'd, page aligned, UVA-addressable
        # Zero-copy: the numpy array's base is `mem`, and the tensor holds the array, so the pinned
        # block returns to the pool only when the last view of the tensor dies. uint8 then view(),
        # since numpy has no bfloat16.
        flat = torch.from_numpy(np.frombuffer(mem, dtype=np.uint8, count=nbytes))
        return flat.view(dtype).view(shape).zero_()

    # ---- jobs ----------------------------------------------------------------------------------
    def _validate(self, job: TransferJob) -> None:
        host_side = {Direction.H2D: job.src, Direction.D2H: job.dst, Direction.D2D: None}[job.direction]
        for t in (job.src, job.dst):
            want = torch.device("cpu") if t is host_side else self.device
            if t.device != want:
                raise ValueError(f"{job.direction.name} job: expected a tensor on {want}, got {t.device}")
        _check_rows(job.src, job.src_index, "src")
        _check_rows(job.dst, job.dst_index, "dst")

    def submit(self, job: TransferJob) -> int:
        if self._closed:
            raise RuntimeError("submit on a closed CudaTransferEngine")
        self._validate(job)
        with torch.cuda.device(self.device):
            self._torch_stream.wait_stream(torch.cuda.current_stream(self.device))
            start = torch.cuda.Event(enable_timing=True)
            start.record(self._torch_stream)
            if job.direction == Direction.D2D:
                self._copy_d2d(job)
            else:
                self._copy_runs(job)
            event = torch.cuda.Event(enable_timing=True)
            event.record(self._torch_stream)
        job_id = self._next_id
        self._next_id += 1
        self._inflight.append(_Pending(job_id, start, event, job))
        self._retire()
        return job_id

    def _copy_runs(self, job: TransferJob) -> None:
        size = job.src.element_size()
        row = math.prod(job.src.shape[1:]) * size
        s_base, s_pitch = job.src.data_ptr(), job.src.stride(0) * size
        d_base, d_pitch = job.dst.data_ptr(), job.dst.stride(0) * size
        memcpy, kind, stream = self._cp.cuda.runtime.memcpyAsync, _KIND[job.direction], self._stream.ptr
        packed = s_pitch == row and d_pitch == row  # a run of rows is one span on both sides
        with self._cp.cuda.Device(self.device.index):
            for s, d, n in contiguous_runs(job.src_index, job.dst_index):
                if packed:
                    memcpy(d_base + d * d_pitch, s_base + s * s_pitch, n * row, kind, stream)
                    continue
                for i in range(n):
                    memcpy(d_base + (d + i) * d_pitch, s_base + (s + i) * s_pitch, row, kind, stream)

    def _copy_d2d(self, job: TransferJob) -> None:
        with torch.cuda.stream(self._torch_stream):
            src_index = job.src_index.to(self.device, non_blocking=True)
            dst_index = job.dst_index.to(self.device, non_blocking=True)
            job.dst.index_copy_(0, dst_index, job.src.index_select(0, src_index))

    def _retire(self) -> None:
        """Release jobs whose event has completed (stream order: a prefix of the deque)."""
        while self._inflight and self._inflight[0].event.query():
            done = self._inflight.popleft()
            self._bytes[done.job.direction] += done.job.nbytes
            self._busy[done.job.direction] += done.start.elapsed_time(done.event) / 1e3  # ms -> s

    def _pending(self, job_id: int) -> _Pending | None:
        if not 0 <= job_id < self._next_id:
            raise ValueError(f"unknown job id {job_id} (submitted so far: {self._next_id})")
        self._retire()
        if not self._inflight or job_id < self._inflight[0].job_id:
            return None
        return self._inflight[job_id - self._inflight[0].job_id]

    def wait(self, job_id: int) -> None:
        """Order the caller's current stream after the job; the CPU does not block."""
        pending = self._pending(job_id)
        if pending is not None:
            torch.cuda.current_stream(self.device).wait_event(pending.event)

    def wait_host(self, job_id: int) -> None:
        """Block the CPU until the job is done (for CPU readers of host rows a D2H job wrote)."""
        pending = self._pending(job_id)
        if pending is not None:
            pending.event.synchronize()
            self._retire()

    def synchronize(self) -> None:
        self._stream.synchronize()
        self._retire()

    @property
    def bytes_moved(self) -> dict[Direction, int]:
        self._retire()
        return dict(self._bytes)

    @property
    def busy_seconds(self) -> dict[Direction, float]:
        """Copy-stream time spent per direction (completed jobs), from the jobs' timing events."""
        self._retire()
        return dict(self._busy)

    def close(self) -> None:
        """Finish every queued copy and release the stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.synchronize()
        self._inflight.clear()

    def __enter__(self) -> CudaTransferEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter teardown: CUDA/CuPy may already be gone
            pass
