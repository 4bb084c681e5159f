"""The worker-side KV store: tier tensors, moves, per-layer prefetch into staging, attention reads.

Pools are `[num_blocks, 2, Hkv, block_size, D]` (0 = K, 1 = V): head-major inside a block, so a
request's K for one head is a run of `block_size x D` slabs and one gather yields SDPA's layout. For a layer on host, the request's
blocks are copied into a device staging slot before the layer computes (issued `prefetch_depth`
host layers ahead, so the copy overlaps the compute of earlier layers); the new tokens are written
into the staging copy, attention reads it, and the touched blocks are written back to host. The
transfer engine runs jobs in order, so a write-back always lands before the next step's prefetch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orbitflow_kernels import Direction, TransferEngine, TransferJob
from orbitflow_kernels.gather import gather_kv, scatter_tokens
from orbitflow_ray.kv.blocks import MoveOp, Tier
from orbitflow_ray.kv.tier_manager import cdiv
from orbitflow_ray.sched.output import ScheduledSeq


@dataclass(slots=True)
class _HostLayer:
    """One host-resident layer of this step: which seqs, where their blocks sit in the slot."""

    layer: int
    offsets: dict[int, int]  # seq index -> its first block in the slot
    num_blocks: int  # slot blocks this layer needs
    job_id: int | None = None
    slot: int = -1


def _idx(values) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.int64)


class KVStore:
    def __init__(self, engine: TransferEngine, device_blocks: int, host_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, prefetch_depth: int) -> None:
        self.engine = engine
        self.block_size = block_size
        self.row_shape = (2, num_kv_heads, block_size, head_dim)
        self.dtype = dtype
        self.pools = {Tier.DEVICE: engine.alloc_device((device_blocks, *self.row_shape), dtype),
                      Tier.HOST: engine.alloc_host((host_blocks, *self.row_shape), dtype)}
        self.depth = prefetch_depth
        self._slots: list[torch.Tensor | None] = [None] * (prefetch_depth + 1)
        self._seqs: list[ScheduledSeq] = []
        self._host_layers: dict[int, _HostLayer] = {}
        self._order: list[int] = []
        self._issued = 0

    @property
    def staging_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._slots if s is not None)

    # ---- placement changes ---------------------------------------------------------------------
    def apply_moves(self, moves: list[MoveOp]) -> None:
        """Copy re-homed layers, batched into one job per direction, and wait: the freed source
        blocks may be handed out again in this very step."""
        by_dir: dict[tuple[Tier, Tier], tuple[list[int], list[int]]] = {}
        for op in moves:
            src, dst = by_dir.setdefault((op.src_tier, op.dst_tier), ([], []))
            src.extend(op.src_blocks)
            dst.extend(op.dst_blocks)
        last = None
        for (s, d), (src, dst) in by_dir.items():
            if src:
                direction = Direction.D2H if s == Tier.DEVICE else Direction.H2D
                last = self.engine.submit(TransferJob(self.pools[s], self.pools[d], _idx(src), _idx(dst), direction))
        if last is not None:
            self.engine.wait(last)

    # ---- one step ------------------------------------------------------------------------------
    def begin_step(self, seqs: list[ScheduledSeq]) -> None:
        self._seqs = seqs
        self._host_layers = {}
        num_layers = len(seqs[0].table) if seqs else 0
        for layer in range(num_layers):
            idx = [i for i, s in enumerate(seqs) if s.table[layer].tier == Tier.HOST]
            if not idx:
                continue
            offsets, total = {}, 0
            for i in idx:
                offsets[i] = total
                total += cdiv(seqs[i].start_pos + len(seqs[i].token_ids), self.block_size)
            self._host_layers[layer] = _HostLayer(layer, offsets, total)
        self._order = sorted(self._host_layers)
        self._issued = 0

    def before_layer(self, layer: int) -> None:
        """Issue prefetches up to `depth` host layers ahead of `layer`, then wait for its own."""
        ahead = [l for l in self._order if l >= layer][: self.depth + 1]
        while self._issued < len(self._order) and self._order[self._issued] <= (ahead[-1] if ahead else -1):
            self._prefetch(self._host_layers[self._order[self._issued]], self._issued % len(self._slots))
            self._issued += 1
        hl = self._host_layers.get(layer)
        if hl is not None and hl.job_id is not None:
            self.engine.wait(hl.job_id)

    def _prefetch(self, hl: _HostLayer, slot: int) -> None:
        hl.slot = slot
        buf = self._slots[slot]
        if buf is None or buf.shape[0] < hl.num_blocks:
            self._slots[slot] = buf = self.engine.alloc_device((hl.num_blocks, *self.row_shape), self.dtype)
        src, dst = [], []
        for i, off in hl.offsets.items():
            seq = self._seqs[i]
            ctx_blocks = cdiv(seq.start_pos, self.block_size)
            src.extend(seq.table[hl.layer].blocks[:ctx_blocks])
            dst.extend(range(off, off + ctx_blocks))
        # Submitted even when empty (a prefill from position 0): waiting on it fences the slot
        # against the still-running write-back of the layer that used it before.
        hl.job_id = self.engine.submit(TransferJob(self.pools[Tier.HOST], buf, _idx(src), _idx(dst), Direction.H2D))

    def _location(self, layer: int, i: int) -> tuple[torch.Tensor, list[int]]:
        """The tensor and block ids holding seq i's layer for this step."""
        seq = self._seqs[i]
        lk = seq.table[layer]
        if lk.tier == Tier.DEVICE:
            return self.pools[Tier.DEVICE], lk.blocks
        hl = self._host_layers[layer]
        off = hl.offsets[i]
        n = cdiv(seq.start_pos + len(seq.token_ids), self.block_size)
        return self._slots[hl.slot], list(range(off, off + n))

    def write_and_read(self, layer: int, i: int, k: torch.Tensor, v: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store seq i's new K/V [n, Hkv, D] for `layer`; return its full K, V as
        [1, Hkv, ctx + n, D], the layout SDPA takes."""
        seq = self._seqs[i]
        pool, blocks = self._location(layer, i)
        end = seq.start_pos + k.shape[0]
        pos = torch.arange(seq.start_pos, end, device=k.device)
        ids = torch.as_tensor(blocks, dtype=torch.int64, device=pool.device)
        scatter_tokens(pool, ids[pos // self.block_size], pos % self.block_size, torch.stack([k, v], 1))
        if seq.start_pos == 0:  # nothing cached before: attend on the new K/V, skip the gather
            return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        kv = gather_kv(pool, ids, end)
        return kv[0].unsqueeze(0), kv[1].unsqueeze(0)

    def after_layer(self, layer: int) -> None:
        """Write the blocks this step touched back to host for every host seq of `layer`."""
        hl = self._host_layers.get(layer)
        if hl is None:
            return
        src, dst = [], []
        for i, off in hl.offsets.items():
            seq = self._seqs[i]
            first = seq.start_pos // self.block_size
            last = cdiv(seq.start_pos + len(seq.token_ids), self.block_size)
            src.extend(range(off + first, off + last))
            dst.extend(seq.table[layer].blocks[first:last])
        self.engine.submit(TransferJob(self._slots[hl.slot], self.pools[Tier.HOST], _idx(src), _idx(dst), Direction.D2H))
