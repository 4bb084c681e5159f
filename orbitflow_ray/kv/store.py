"""The worker-side KV store: tier tensors, moves, per-layer prefetch into staging, attention reads.

Pools are `[num_blocks, 2, Hkv, block_size, D]` (0 = K, 1 = V): head-major inside a block, so a
request's K for one head is a run of `block_size x D` slabs and one gather yields SDPA's layout. For a layer on host, the request's
blocks are copied into a device staging slot before the layer computes (issued `prefetch_depth`
host layers ahead, so the copy overlaps the compute of earlier layers); the new tokens are written
into the staging copy, attention reads it, and the touched blocks are written back to host. The
transfer engine runs jobs in order, so a write-back always lands before the next step's prefetch.
"""

from __future__ import annotations

import time
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
        self._move_jobs: dict[int, int] = {}  # layer -> its host -> device move job, in flight
        self.last_stall_s = 0.0  # compute waiting on transfers in the last step (cost-model fit)

    @property
    def staging_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._slots if s is not None)

    # ---- placement changes ---------------------------------------------------------------------
    def apply_moves(self, moves: list[MoveOp]) -> None:
        """Copy re-homed layers. Device -> host moves go first, in one job, and are waited for:
        the device blocks they free may be handed out again in this very step. Host -> device
        moves go one job per layer and are waited for only before that layer computes
        (`before_layer`), so they overlap the compute of the layers before it. That is safe
        because nothing else touches their destination blocks before that layer, and every write
        into the host blocks they free (a write-back, a later move) is queued after them on the
        in-order link."""
        t0 = time.perf_counter()  # every wait of a step counts as stall, these included
        self.wait_moves()  # a step with moves but no compute left some in flight
        out_src, out_dst = [], []
        into: dict[int, tuple[list[int], list[int]]] = {}
        filled: set[int] = set()  # device blocks that copies to device issued so far will write
        for op in moves:
            if op.dst_tier == Tier.HOST:
                if not filled.isdisjoint(op.src_blocks):
                    # Copies to host run first, so this one would read blocks before they are
                    # filled; the tier manager undoes such round trips (`KVTierManager.move`).
                    raise RuntimeError(f"{op.request_id} layer {op.layer}: a move to host reads device "
                                       "blocks that an earlier move to device of this step has yet to fill")
                out_src.extend(op.src_blocks)
                out_dst.extend(op.dst_blocks)
            else:
                src, dst = into.setdefault(op.layer, ([], []))
                filled.update(op.dst_blocks)
                src.extend(op.src_blocks)
                dst.extend(op.dst_blocks)
        if out_src:
            self.engine.wait(self.engine.submit(TransferJob(
                self.pools[Tier.DEVICE], self.pools[Tier.HOST], _idx(out_src), _idx(out_dst), Direction.D2H)))
        self.last_stall_s = time.perf_counter() - t0
        for layer in sorted(into):
            src, dst = into[layer]
            self._move_jobs[layer] = self.engine.submit(TransferJob(
                self.pools[Tier.HOST], self.pools[Tier.DEVICE], _idx(src), _idx(dst), Direction.H2D))

    def wait_moves(self) -> None:
        """Wait for every move still in flight (the next step's compute does this layer by layer)."""
        if self._move_jobs:
            self.engine.wait(max(self._move_jobs.values()))
            self._move_jobs = {}

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
        if seqs:
            self._index_step(seqs, num_layers)

    def _index_step(self, seqs: list[ScheduledSeq], num_layers: int) -> None:
        """Build this step's block ids once, as tensors: per (layer, seq) the blocks where its KV
        sits (device pool ids, or staging-slot ids for a host layer), and per (layer, new token) its
        block, so that each layer costs one scatter and one index_select per seq, not a rebuild of
        id tensors per (layer, seq) from Python lists."""
        bs = self.block_size
        nbs = [cdiv(s.start_pos + len(s.token_ids), bs) for s in seqs]
        self._bases = [0] * len(seqs)
        for i in range(1, len(seqs)):
            self._bases[i] = self._bases[i - 1] + nbs[i - 1]
        flat: list[int] = []
        self._groups: list[list[tuple[Tier, torch.Tensor | None]]] = []
        rel: list[int] = []
        pos: list[int] = []
        for i, s in enumerate(seqs):
            rel.extend(self._bases[i] + p // bs for p in range(s.start_pos, s.start_pos + len(s.token_ids)))
            pos.extend(range(s.start_pos, s.start_pos + len(s.token_ids)))
        for layer in range(num_layers):
            hl = self._host_layers.get(layer)
            for i, s in enumerate(seqs):
                if hl is not None and i in hl.offsets:
                    flat.extend(range(hl.offsets[i], hl.offsets[i] + nbs[i]))
                else:
                    flat.extend(s.table[layer].blocks[:nbs[i]])
            self._groups.append(self._tier_groups(seqs, hl))
        if len(flat) != num_layers * sum(nbs):
            raise RuntimeError("a block table is shorter than its seq's tokens of this step")
        dev = self.pools[Tier.DEVICE].device
        self._ids = torch.tensor(flat, dtype=torch.int64).view(num_layers, -1).to(dev)
        self._tok_ids = self._ids[:, torch.tensor(rel, dtype=torch.int64, device=dev)]
        self._tok_off = torch.tensor(pos, dtype=torch.int64, device=dev) % bs
        self._nbs = nbs

    def _tier_groups(self, seqs: list[ScheduledSeq], hl: _HostLayer | None
                     ) -> list[tuple[Tier, torch.Tensor | None]]:
        """[(tier, token indices or None for all tokens)] of one layer's new tokens."""
        if hl is None:
            return [(Tier.DEVICE, None)]
        if len(hl.offsets) == len(seqs):
            return [(Tier.HOST, None)]
        toks: dict[Tier, list[int]] = {Tier.DEVICE: [], Tier.HOST: []}
        t = 0
        for i, s in enumerate(seqs):
            n = len(s.token_ids)
            toks[Tier.HOST if i in hl.offsets else Tier.DEVICE].extend(range(t, t + n))
            t += n
        dev = self.pools[Tier.DEVICE].device
        return [(tier, torch.tensor(ix, dtype=torch.int64, device=dev)) for tier, ix in toks.items() if ix]

    def before_layer(self, layer: int) -> None:
        """Issue prefetches up to `depth` host layers ahead of `layer`, then wait for its own."""
        ahead = [l for l in self._order if l >= layer][: self.depth + 1]
        while self._issued < len(self._order) and self._order[self._issued] <= (ahead[-1] if ahead else -1):
            self._prefetch(self._host_layers[self._order[self._issued]], self._issued % len(self._slots))
            self._issued += 1
        hl = self._host_layers.get(layer)
        jobs = [j for j in (self._move_jobs.pop(layer, None), hl.job_id if hl is not None else None)
                if j is not None]
        if jobs:
            t0 = time.perf_counter()
            self.engine.wait(max(jobs))  # in-order link: the later job's end covers both
            self.last_stall_s += time.perf_counter() - t0

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

    def _tensor(self, layer: int, tier: Tier) -> torch.Tensor:
        """The tensor that holds `tier`'s seqs of `layer` this step: the device pool, or the slot."""
        return self.pools[Tier.DEVICE] if tier == Tier.DEVICE else self._slots[self._host_layers[layer].slot]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new K/V [N, Hkv, D] of every seq of this step (flattened in step order) for
        `layer`: one scatter per tier the layer's seqs live on."""
        kv = torch.stack([k, v], 1)
        ids, off = self._tok_ids[layer], self._tok_off
        for tier, toks in self._groups[layer]:
            if toks is None:
                scatter_tokens(self._tensor(layer, tier), ids, off, kv)
            else:
                scatter_tokens(self._tensor(layer, tier), ids[toks], off[toks], kv[toks])

    def read(self, layer: int, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Seq i's full K, V for `layer` as [1, Hkv, ctx + n, D], the layout SDPA takes, after
        `write`; k, v [n, Hkv, D] are its new tokens, returned as they are when nothing was cached."""
        seq = self._seqs[i]
        if seq.start_pos == 0:  # nothing cached before: attend on the new K/V, skip the gather
            return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        tier = Tier.HOST if seq.table[layer].tier == Tier.HOST else Tier.DEVICE
        base = self._bases[i]
        kv = gather_kv(self._tensor(layer, tier), self._ids[layer, base:base + self._nbs[i]],
                       seq.start_pos + k.shape[0])
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
