"""Device copies of the host-resident layers of prompts being prefilled, kept across chunks.

Without them, every prefill chunk of a host layer copies the whole prior context into staging again:
a P-token prompt in C-token chunks moves about P^2 / 2C tokens per host layer over the link. Here a
request's host layer gets its own device buffer on its first chunk (position 0); each chunk writes
its new tokens into it, attends over it, and writes only the blocks it touched back to host. The
host copy is therefore always current, so a buffer is a cache: dropping it at any time (prefill
done, the request forgotten or preempted, the layer moved to device, no room) costs no correctness,
only the re-reads it saved. Link bytes of a whole prompt are its host layers' KV, written once.

Buffers are taken from a fixed block budget (part of the staging reservation, `KVStore`); a layer
that does not fit is staged chunk by chunk as before. A dropped buffer may still be read by its last
write-back, so its blocks count against the budget until that copy is known to be done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from orbitflow_kernels import TransferEngine


@dataclass(slots=True)
class _Prompt:
    tokens: int  # tokens whose KV the buffers hold (the next chunk's start_pos)
    buffers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [blocks, *row_shape]
    last_job: int | None = None  # the latest write-back reading one of the buffers


class PromptStage:
    def __init__(self, engine: TransferEngine, row_shape: tuple[int, ...], dtype: torch.dtype,
                 block_size: int, budget_blocks: int) -> None:
        if budget_blocks < 0:
            raise ValueError(f"budget_blocks must be >= 0, got {budget_blocks}")
        self.engine = engine
        self.row_shape = row_shape
        self.dtype = dtype
        self.block_size = block_size
        self.budget_blocks = budget_blocks
        self._prompts: dict[str, _Prompt] = {}
        self._retired: list[tuple[int, int | None]] = []  # (blocks, last write-back job) not yet freed

    @property
    def used_blocks(self) -> int:
        live = sum(b.shape[0] for p in self._prompts.values() for b in p.buffers.values())
        return live + sum(n for n, _ in self._retired)

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._drop(rid)

    def pin(self, request_ids: list[str], starts: list[int], lens: list[int], targets: list[int],
            host: torch.Tensor) -> torch.Tensor:
        """Which (layer, seq) of this step read and write a prompt buffer instead of the shared
        staging slot: bool [L, R]. host [L, R] says which layers of each seq are on host;
        targets[i] is the token count seq i's prefill reaches (the buffer's size on first use).
        Only prefill chunks (more than one token) are pinned; any other seq drops its buffers."""
        pinned = torch.zeros_like(host)
        for i, rid in enumerate(request_ids):
            p = self._prompts.get(rid)
            if lens[i] <= 1 or (p is not None and p.tokens != starts[i]):
                self._drop(rid)
                p = None
            if lens[i] <= 1:
                continue
            layers = host[:, i].nonzero().flatten().tolist()
            if p is not None:  # a layer moved to device meanwhile: its buffer is stale
                for layer in [l for l in p.buffers if l not in layers]:
                    self._retired.append((p.buffers.pop(layer).shape[0], p.last_job))
            if p is None and starts[i] == 0:
                p = self._prompts[rid] = _Prompt(0)
            if p is None:
                continue
            end = starts[i] + lens[i]
            need = -(-max(end, targets[i]) // self.block_size)
            for layer in layers:
                if (layer in p.buffers or starts[i] == 0) and self._fit(p, layer, need, end):
                    pinned[layer, i] = True
                elif layer in p.buffers:  # no room to grow: it would miss this chunk's tokens
                    self._retired.append((p.buffers.pop(layer).shape[0], p.last_job))
            p.tokens = end
        return pinned

    def buffer(self, request_id: str, layer: int) -> torch.Tensor:
        return self._prompts[request_id].buffers[layer]

    def wrote_back(self, request_id: str, job_id: int) -> None:
        self._prompts[request_id].last_job = job_id

    def _fit(self, p: _Prompt, layer: int, need: int, end: int) -> bool:
        """Give layer a buffer of at least `need` blocks (keeping the KV it holds); False if the
        budget has no room, after freeing retired buffers whose write-backs are done."""
        old = p.buffers.get(layer)
        if old is not None and -(-end // self.block_size) <= old.shape[0]:
            return True
        grow = need - (old.shape[0] if old is not None else 0)
        if self.used_blocks + grow > self.budget_blocks and self._retired:
            last = [j for _, j in self._retired if j is not None]
            if last:
                self.engine.wait(max(last))
            self._retired = []
        if self.used_blocks + grow > self.budget_blocks:
            return False
        buf = self.engine.alloc_device((need, *self.row_shape), self.dtype)
        if old is not None:
            buf[: old.shape[0]] = old
            self._retired.append((old.shape[0], p.last_job))
        p.buffers[layer] = buf
        return True

    def _drop(self, rid: str) -> None:
        p = self._prompts.pop(rid, None)
        if p is not None:
            self._retired.extend((b.shape[0], p.last_job) for b in p.buffers.values())
