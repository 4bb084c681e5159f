"""Block pools of one tier and the plan objects that describe KV placement and moves.

Scheduler-side bookkeeping only: no tensors here, so the simulator can run the same code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Tier(enum.IntEnum):
    DEVICE = 0
    HOST = 1


@dataclass(slots=True)
class LayerKV:
    """Where one layer of one request lives: the tier and the block ids in that tier's pool."""

    tier: Tier
    blocks: list[int]


@dataclass(frozen=True, slots=True)
class MoveOp:
    """Copy one layer of one request from one tier to the other. The source blocks are already
    released in the bookkeeping; the executor must finish the copy before the step computes."""

    request_id: str
    layer: int
    src_tier: Tier
    src_blocks: tuple[int, ...]
    dst_tier: Tier
    dst_blocks: tuple[int, ...]


class BlockPool:
    """Free list of fixed-size blocks. Check-then-act: `can_allocate` before `allocate`.

    Memory is O(blocks in use): never-used blocks are a counter, not a list, so a simulated host
    tier of millions of blocks costs nothing until it fills. Recycled blocks are reused first."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        # freed blocks, oldest first, from `_head` on (a list and an offset: a slice hands out k at once)
        self._recycled: list[int] = []
        self._head = 0
        self._fresh = 0  # blocks fresh .. num_blocks-1 were never handed out
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return self.num_blocks - len(self._used)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def used_blocks(self) -> frozenset[int]:
        return frozenset(self._used)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int] | None:
        if n > self.num_free:
            return None
        k = min(n, len(self._recycled) - self._head)
        out = self._recycled[self._head:self._head + k]
        self._head += k
        if self._head > 4096 and 2 * self._head > len(self._recycled):  # drop the handed-out prefix
            del self._recycled[:self._head]
            self._head = 0
        out.extend(range(self._fresh, self._fresh + n - k))
        self._fresh += n - k
        self._used.update(out)
        return out

    def free(self, blocks: list[int] | tuple[int, ...]) -> None:
        gone = set(blocks)
        if len(gone) != len(blocks) or not gone <= self._used:
            bad = sorted((gone - self._used) or {b for b in blocks if list(blocks).count(b) > 1})
            raise RuntimeError(f"double free of block(s) {bad[:5]}")
        self._used -= gone
        self._recycled.extend(blocks)
