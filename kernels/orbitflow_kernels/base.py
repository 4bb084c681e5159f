"""The transfer-engine contract: the worker-side half of KV offloading.

The scheduler-side tier manager decides which blocks move; an engine only copies. A job copies whole
rows along dim 0: `dst[dst_index] = src[src_index]`. Jobs run in submission order (one FIFO stream),
so a device->host write of step t always lands before a host->device prefetch of step t+1 reads it.
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


class TransferError(RuntimeError):
    """A queued job failed; raised by `wait`/`synchronize`, chained to the original error."""


class TransferEngine(abc.ABC):
    """Allocates tier memory and runs copy jobs asynchronously, in order."""

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
    def wait(self, job_id: int) -> None:
        """Return once the job's data is visible to the compute stream (CUDA: stream waits on event)."""

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait for every submitted job."""

    @property
    @abc.abstractmethod
    def bytes_moved(self) -> dict[Direction, int]:
        """Bytes copied so far per direction (completed jobs)."""

    def close(self) -> None:
        """Stop worker threads / release streams. Idempotent."""
