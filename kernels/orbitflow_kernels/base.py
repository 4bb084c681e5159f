"""The transfer-engine contract: the worker-side half of KV offloading.

The scheduler-side tier manager decides which blocks move; an engine only copies. A job copies whole
rows along dim 0: `dst[dst_index] = src[src_index]`. Order: a job that touches rows an earlier job
touches, one of them writing, runs after it, so a device->host write of step t always lands before a
host->device prefetch of step t+1 reads it (the CPU engine runs every job in submission order; the
CUDA engine has one stream per direction and orders across them only where rows conflict). A wait
on a job covers it and every job submitted before it.
Both engines measure the same things, each with its own clock: `busy_seconds` (link time per
direction) and `stall_seconds` (time compute was held in `wait`, per the caller's tag).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass

import torch


class Direction(enum.Enum):
    H2D = "h2d"
    D2H = "d2h"
    D2D = "d2d"


@dataclass(slots=True)
class TransferJob:
    src: torch.Tensor
    dst: torch.Tensor
    src_index: torch.Tensor  # int64, on CPU
    dst_index: torch.Tensor  # int64, on CPU
    direction: Direction

    def __post_init__(self) -> None:
        if self.src_index.numel() != self.dst_index.numel():
            raise ValueError("src_index and dst_index must have the same length")
        if self.src.shape[1:] != self.dst.shape[1:] or self.src.dtype != self.dst.dtype:
            raise ValueError(f"row shape/dtype mismatch: {self.src.shape}/{self.src.dtype} vs "
                             f"{self.dst.shape}/{self.dst.dtype}")

    @property
    def nbytes(self) -> int:
        row = self.src[0].numel() * self.src.element_size() if self.src.shape[0] else 0
        return int(self.src_index.numel()) * row


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


def check_row_index(t: torch.Tensor, index: torch.Tensor, what: str) -> None:
    """Raise IndexError unless every row index is in [0, rows of t): raw-pointer copies (CUDA) have
    no bounds checks of their own, and numpy (CPU) would wrap a negative index."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= t.shape[0]):
        raise IndexError(f"{what}: row index out of range [0, {t.shape[0]}): "
                         f"min {int(index.min())}, max {int(index.max())}")


class TransferError(RuntimeError):
    """A queued job failed; raised by `wait`/`synchronize`, chained to the original error."""


class TransferEngine(abc.ABC):
    """Allocates tier memory and runs copy jobs asynchronously, ordered as above."""

    device: torch.device  # where the model computes ("cpu" for the CPU backend)

    @abc.abstractmethod
    def alloc_device(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Zeroed device-tier memory (GPU HBM, or a budgeted RAM region on CPU)."""

    @abc.abstractmethod
    def alloc_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Zeroed host-tier memory (pinned on CUDA, so copies can be async)."""

    @abc.abstractmethod
    def submit(self, job: TransferJob) -> int:
        """Queue a job; returns its id. Never blocks on the copy itself."""

    @abc.abstractmethod
    def wait(self, job_id: int, tag: int = -1) -> None:
        """Return once the data of the job and of every job before it is visible to compute (CUDA:
        the compute stream waits on events). The time compute is held counts in stall_seconds[tag]
        (the KV store tags a layer's wait with the layer, -1 otherwise)."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait for every submitted job."""

    @property
    @abc.abstractmethod
    def bytes_moved(self) -> dict[Direction, int]:
        """Bytes copied so far per direction (completed jobs)."""

    @property
    @abc.abstractmethod
    def busy_seconds(self) -> dict[Direction, float]:
        """Link seconds spent so far per direction (completed jobs): the cost model's bandwidth."""

    @property
    @abc.abstractmethod
    def stall_seconds(self) -> dict[int, float]:
        """Seconds compute was held in `wait` so far, per tag (waits that completed)."""

    def close(self) -> None:
        """Stop worker threads / release streams. Idempotent."""
