"""The CUDA transfer engine: an HBM device tier, a CuPy-pinned host tier, one copy stream per direction.

Design. Every job is issued at submit() as DMA on a dedicated non-blocking CuPy stream, one for
host -> device (which also runs device -> device jobs) and one for device -> host, so a layer's
write-back overlaps the next layers' prefetches on a full-duplex link: one `cudaMemcpyAsync` per run
of rows that are consecutive on both sides (vLLM's swap_blocks copies block by block the same way;
KV rows are whole blocks, tens of KB, so per-run DMA runs near link speed). Host rows are written or
read in place, with no host-side gather into a staging buffer and no host-side scatter afterwards, so:
  * a D2H job is complete, host rows included, exactly when its event completes: there is no
    completion step to run on a CPU thread, and nothing for wait() to poll;
  * submit() never touches payload bytes on the CPU; its cost is one API call per run.
Order (the contract in `base.py`): each stream is FIFO; a job that touches rows an in-flight job on
the other stream touches, one of them writing, first makes its stream wait for that job's event
(`conflicts`), so a D2H write-back followed by an H2D prefetch of the same host rows, or a prefetch
into a staging slot whose previous write-back still reads it, needs no CPU blocking. wait(job)
covers the job and every job submitted before it, on both streams.
D2D jobs are two torch index kernels on the H2D stream (one launch pair, whatever the row count).
Before its copies, each job makes its stream wait for the caller's current (compute) stream, so
it reads what compute wrote before submit and never overwrites rows that compute still reads.
wait(job) makes the compute stream wait on the events: the CPU does not block. A CPU reader of
host rows written by D2H must call `wait_host(job)` or `synchronize()` first. The engine keeps each
job's tensors alive until its event has completed, so callers may drop them right after submit.
Host memory comes from CuPy's process-wide pinned pool: a pooled block is released to the pool only
when its tensor dies, and the pool itself never dies before the process does.
Measured with CUDA events, as the CPU engine measures with its clock: each job's copies sit between
two timing events (`busy_seconds`: the link time each direction took, the cost model's effective
bandwidth), and each wait() that makes compute wait sits between two events on the compute stream
(`stall_seconds`: how long compute was held, per the tag the caller gave, e.g. the layer). Both
count only what has completed when read (they never block): the model runner reads them after a
step whose sampling synchronised compute, so a step's figures are whole unless it sampled nothing.
Not thread-safe: one caller thread (the model runner) submits and waits.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from orbitflow_kernels.base import Direction, TransferEngine, TransferJob, check_row_index, contiguous_runs

GPU_HELP = ("CUDA transfer engine needs CuPy for your CUDA major version and a GPU: "
            "pip install 'orbitflow-ray[gpu]' (cupy-cuda12x) or 'orbitflow-ray[gpu-cu13]' (cupy-cuda13x)")
_KIND = {Direction.H2D: 1, Direction.D2H: 2}  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost
_STREAMS = (Direction.H2D, Direction.D2H)  # one copy stream each; D2D jobs run on the H2D one


def _load_cupy():
    try:
        import cupy
        if not torch.cuda.is_available() or cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device visible to torch and CuPy")
    except Exception as exc:  # ImportError, a CPU-only torch, a driver without devices
        raise RuntimeError(GPU_HELP) from exc
    return cupy


def _check_rows(t: torch.Tensor, index: torch.Tensor, what: str) -> None:
    """Raw-pointer copies have no bounds checks of their own: check here, at submit."""
    if t.dim() == 0 or (t.shape[0] and not t[0].is_contiguous()):
        raise ValueError(f"{what}: rows must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")
    check_row_index(t, index, what)


def _sides(job: TransferJob) -> tuple[tuple[torch.Tensor, torch.Tensor, bool], ...]:
    """(tensor, row index, written) for each side of a job."""
    return (job.src, job.src_index, False), (job.dst, job.dst_index, True)


def _rows_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    if int(a.max()) < int(b.min()) or int(b.max()) < int(a.min()):
        return False
    return bool(torch.isin(a.reshape(-1), b.reshape(-1)).any())


def conflicts(a: TransferJob, b: TransferJob) -> bool:
    """True when a and b touch the same rows of the same memory and at least one of them writes
    them: then the later must not start before the earlier ends. Two views of one storage that do
    not index rows alike (another offset or row stride) count as touching the same rows."""
    for ta, ia, wa in _sides(a):
        for tb, ib, wb in _sides(b):
            if not (wa or wb) or ta.device != tb.device:
                continue
            if ta.untyped_storage().data_ptr() != tb.untyped_storage().data_ptr():
                continue
            if ta.data_ptr() != tb.data_ptr() or ta.stride(0) != tb.stride(0) or _rows_overlap(ia, ib):
                return True
    return False


@dataclass(slots=True)
class _Pending:
    job_id: int
    stream: Direction  # the stream it runs on: H2D (D2D jobs too) or D2H
    start: torch.cuda.Event  # recorded once the copy stream reaches the job: busy = start -> event
    event: torch.cuda.Event
    job: TransferJob  # held so its tensors outlive the copy


@dataclass(slots=True)
class _Stall:
    tag: int
    arrive: torch.cuda.Event  # compute reached the wait
    resume: torch.cuda.Event  # compute went on: arrive -> resume is the stall


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
            self._streams = {d: cp.cuda.Stream(non_blocking=True) for d in _STREAMS}
        self._torch_streams = {d: torch.cuda.ExternalStream(st.ptr, device=dev) for d, st in self._streams.items()}
        self._pinned = cp.get_default_pinned_memory_pool()
        self._inflight: dict[Direction, deque[_Pending]] = {d: deque() for d in _STREAMS}
        self._stalls: deque[_Stall] = deque()
        self._next_id = 0
        self._bytes = {d: 0 for d in Direction}
        self._busy = {d: 0.0 for d in Direction}
        self._stall_s: dict[int, float] = {}
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
        self._retire()
        key = Direction.D2H if job.direction == Direction.D2H else Direction.H2D
        stream = self._torch_streams[key]
        with torch.cuda.device(self.device):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            other = next((p for p in reversed(self._inflight[_other(key)]) if conflicts(p.job, job)), None)
            if other is not None:  # the other stream's queue is FIFO: its newest conflict covers the rest
                stream.wait_event(other.event)
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            if job.direction == Direction.D2D:
                self._copy_d2d(job, stream)
            else:
                self._copy_runs(job, self._streams[key].ptr)
            event = torch.cuda.Event(enable_timing=True)
            event.record(stream)
        job_id = self._next_id
        self._next_id += 1
        self._inflight[key].append(_Pending(job_id, key, start, event, job))
        return job_id

    def _copy_runs(self, job: TransferJob, stream: int) -> None:
        size = job.src.element_size()
        row = math.prod(job.src.shape[1:]) * size
        s_base, s_pitch = job.src.data_ptr(), job.src.stride(0) * size
        d_base, d_pitch = job.dst.data_ptr(), job.dst.stride(0) * size
        memcpy, kind = self._cp.cuda.runtime.memcpyAsync, _KIND[job.direction]
        packed = s_pitch == row and d_pitch == row  # a run of rows is one span on both sides
        with self._cp.cuda.Device(self.device.index):
            for s, d, n in contiguous_runs(job.src_index, job.dst_index):
                if packed:
                    memcpy(d_base + d * d_pitch, s_base + s * s_pitch, n * row, kind, stream)
                    continue
                for i in range(n):
                    memcpy(d_base + (d + i) * d_pitch, s_base + (s + i) * s_pitch, row, kind, stream)

    def _copy_d2d(self, job: TransferJob, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            src_index = job.src_index.to(self.device, non_blocking=True)
            dst_index = job.dst_index.to(self.device, non_blocking=True)
            job.dst.index_copy_(0, dst_index, job.src.index_select(0, src_index))

    def _retire(self) -> None:
        """Release jobs whose event has completed (stream order: a prefix of each queue), and
        count the stalls whose events have completed."""
        for queue in self._inflight.values():
            while queue and queue[0].event.query():
                done = queue.popleft()
                self._bytes[done.job.direction] += done.job.nbytes
                self._busy[done.job.direction] += done.start.elapsed_time(done.event) / 1e3  # ms -> s
        while self._stalls and self._stalls[0].resume.query():
            st = self._stalls.popleft()
            self._stall_s[st.tag] = self._stall_s.get(st.tag, 0.0) + st.arrive.elapsed_time(st.resume) / 1e3

    def _covering(self, job_id: int) -> list[_Pending]:
        """The in-flight jobs whose end covers job_id and every job before it: per stream, the
        newest in-flight job submitted at or before it."""
        if not 0 <= job_id < self._next_id:
            raise ValueError(f"unknown job id {job_id} (submitted so far: {self._next_id})")
        self._retire()
        out = []
        for queue in self._inflight.values():
            last = next((p for p in reversed(queue) if p.job_id <= job_id), None)
            if last is not None:
                out.append(last)
        return out

    def wait(self, job_id: int, tag: int = -1) -> None:
        """Order the caller's current stream after the job and every job before it; the CPU does not
        block. The time compute is held there is measured with two events (`stall_seconds[tag]`)."""
        pending = self._covering(job_id)
        if not pending:
            return
        compute = torch.cuda.current_stream(self.device)
        arrive, resume = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        arrive.record(compute)
        for p in pending:
            compute.wait_event(p.event)
        resume.record(compute)
        self._stalls.append(_Stall(tag, arrive, resume))

    def wait_host(self, job_id: int) -> None:
        """Block the CPU until the job and every job before it are done (for CPU readers of host rows
        a D2H job wrote)."""
        for p in self._covering(job_id):
            p.event.synchronize()
        self._retire()

    def synchronize(self) -> None:
        for stream in self._streams.values():
            stream.synchronize()
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

    @property
    def stall_seconds(self) -> dict[int, float]:
        """Compute-stream time held by wait(), per tag (completed waits), from timing events."""
        self._retire()
        return dict(self._stall_s)

    def close(self) -> None:
        """Finish every queued copy and release the stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.synchronize()
        for queue in self._inflight.values():
            queue.clear()

    def __enter__(self) -> CudaTransferEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter teardown: CUDA/CuPy may already be gone
            pass


def _other(stream: Direction) -> Direction:
    return Direction.D2H if stream == Direction.H2D else Direction.H2D
