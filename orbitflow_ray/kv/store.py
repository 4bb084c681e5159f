"""The worker-side KV store: tier tensors, moves, per-layer prefetch into staging, attention reads.

Pools are `[num_blocks, 2, Hkv, block_size, D]` (0 = K, 1 = V): head-major inside a block, so a
request's K for one head is a run of `block_size x D` slabs and one gather yields SDPA's layout.
For a layer on host, the request's blocks are copied into a device staging slot before the layer
computes (issued `prefetch_depth` host layers ahead, so the copy overlaps the compute of earlier
layers); the new tokens are written into the staging copy, attention reads it (decodes through
`decode_groups`, prefill chunks through `read`), and the touched blocks are written back to host. The
transfer engine orders jobs that touch the same rows, so a write-back always lands before the next
step's prefetch reads it.
A prefill chunk's host layer instead reads and writes its prompt's own buffer (`PromptStage`), kept
across chunks, so the prior context is not copied in again for every chunk. With `slot_blocks` set
the slots are that size, inside the device budget, and the scheduler keeps each step within them.
Block ids come from the store's own tensor tables (`BlockTables`), kept current by the plan's table
deltas, so indexing a step is a few tensor ops over the batch whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orbitflow_kernels import Direction, TransferEngine, TransferJob
from orbitflow_kernels.gather import gather_kv, scatter_tokens
from orbitflow_ray.kv.block_table import BlockTables
from orbitflow_ray.kv.blocks import MoveOp, Tier
from orbitflow_ray.kv.prefetch import issue_limit
from orbitflow_ray.kv.prompt_stage import PromptStage
from orbitflow_ray.kv.plan import ScheduledSeq


_DEVICE, _SLOT = -1, -2  # where a layer's tokens go (`_HostLayer.parts`); i >= 0: seq i's prompt buffer


@dataclass(slots=True)
class _HostLayer:
    """One host-resident layer of this step: which seqs, where they sit in its staging slot."""

    layer: int
    seqs: torch.Tensor  # int64 [R_h]: indices (in step order) of the seqs staged in the slot
    pinned: list[int]  # seqs whose KV of this layer sits in their prompt buffer (`PromptStage`)
    num_blocks: int  # slot blocks this layer needs
    parts: list[tuple[int, torch.Tensor | None]]  # (_DEVICE | _SLOT | seq, its new tokens; None: all)
    job_id: int | None = None
    slot: int = -1


@dataclass(slots=True)
class PagedGroup:
    """Decode seqs of one layer whose KV sits in one tensor: what batched paged attention reads."""

    seqs: torch.Tensor  # int64 [R_g], CPU: their indices in step order
    pool: torch.Tensor  # the device pool, or the layer's staging slot
    table: torch.Tensor  # [T, W] block ids in `pool`; seq r's row is rows[r] (or r without rows)
    rows: torch.Tensor | None
    seq_lens: torch.Tensor  # [R_g] keys of each seq, its new token included


def _idx(values) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.int64)


def _ranges(table: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Concatenate `table[r, lo[r]:hi[r]]` over rows r, with tensor ops: [sum(hi - lo)]."""
    if table.shape[0] == 0 or int((hi - lo).sum()) == 0:
        return torch.zeros(0, dtype=torch.int64)
    width = int((hi - lo).max())
    cols = lo[:, None] + torch.arange(width)[None, :]
    keep = cols < hi[:, None]
    return table.gather(1, cols.clamp(max=table.shape[1] - 1))[keep]


def _seq_of_tokens(lens: torch.Tensor) -> torch.Tensor:
    """[sum(lens)]: the index of the seq each token belongs to (every len >= 1). A cumulative sum
    of boundary marks: repeat_interleave costs milliseconds per call on some CPU builds."""
    if int(lens.max()) == 1:
        return torch.arange(lens.numel())
    marks = torch.zeros(int(lens.sum()), dtype=torch.int64)
    marks[lens.cumsum(0)[:-1]] = 1
    return marks.cumsum(0)


class KVStore:
    def __init__(self, engine: TransferEngine, device_blocks: int, host_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, prefetch_depth: int,
                 slot_blocks: int | None = None, prompt_blocks: int = 0) -> None:
        """slot_blocks: the most blocks one staging slot holds (prefetch_depth + 1 slots); the
        scheduler never stages more per layer and step (`EngineConfig.staging_kv_bytes`). None:
        each slot grows to the largest layer slice seen. prompt_blocks: the device blocks prompts'
        host layers may keep across prefill chunks (`PromptStage`)."""
        self.engine = engine
        self.block_size = block_size
        self.row_shape = (2, num_kv_heads, block_size, head_dim)
        self.dtype = dtype
        self.pools = {Tier.DEVICE: engine.alloc_device((device_blocks, *self.row_shape), dtype),
                      Tier.HOST: engine.alloc_host((host_blocks, *self.row_shape), dtype)}
        self.depth = prefetch_depth
        self.slot_blocks = slot_blocks
        self.prompts = PromptStage(engine, self.row_shape, dtype, block_size, prompt_blocks)
        self._slots: list[torch.Tensor | None] = [None] * (prefetch_depth + 1)
        self._seqs: list[ScheduledSeq] = []
        self._host_layers: dict[int, _HostLayer] = {}
        self._order: list[int] = []
        self._issued = 0
        self._move_jobs: dict[int, int] = {}  # layer -> its host -> device move job, in flight
        self.tables: BlockTables | None = None  # made at the first step, which says the layer count
        self._stall_mark = 0.0  # the engine's total stall when this step began (`last_stall_s`)

    @property
    def last_stall_s(self) -> float:
        """Seconds compute waited on transfers since this step began (its moves included): the
        engine's `stall_seconds` (its own clock on CPU, CUDA events on CUDA), for the cost model.
        Per layer: `engine.stall_seconds[layer]` (-1: moves and other waits), cumulative."""
        return self._total_stall() - self._stall_mark

    def _total_stall(self) -> float:
        return sum(self.engine.stall_seconds.values())

    @property
    def staging_bytes(self) -> int:
        slots = sum(s.shape[0] for s in self._slots if s is not None)
        return (slots + self.prompts.used_blocks) * self.block_bytes

    @property
    def block_bytes(self) -> int:
        return torch.Size(self.row_shape).numel() * self.dtype.itemsize

    # ---- placement changes ---------------------------------------------------------------------
    def apply_moves(self, moves: list[MoveOp]) -> None:
        """Copy re-homed layers. Device -> host moves go first, in one job, and are waited for:
        the device blocks they free may be handed out again in this very step. Host -> device
        moves go one job per layer and are waited for only before that layer computes
        (`before_layer`), so they overlap the compute of the layers before it. That is safe
        because nothing else touches their destination blocks before that layer, and every write
        into the host blocks they free (a write-back, a later move) is ordered after them by the
        transfer engine (it touches the same rows)."""
        self._stall_mark = self._total_stall()  # every wait of a step counts as stall, these included
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
    def forget(self, request_ids: list[str]) -> None:
        """Drop finished requests' tables (before the plan's deltas: an id may come back)."""
        if self.tables is not None:
            self.tables.forget(request_ids)
        self.prompts.forget(request_ids)

    def begin_step(self, seqs: list[ScheduledSeq]) -> None:
        """Apply the plan's table deltas and index the step, all with tensor ops over the batch:
        per layer and new token its block (device pool id, or staging-slot id for a host layer),
        per host layer where each of its seqs sits in the staging slot."""
        self._seqs = seqs
        self._host_layers = {}
        self._issued = 0
        self._order = []
        if not seqs:
            return
        bs = self.block_size
        if self.tables is None:
            self.tables = BlockTables(len(seqs[0].table), self.pools[Tier.DEVICE].device)
        rows = self.tables.update(seqs)
        starts = torch.tensor([s.start_pos for s in seqs], dtype=torch.int64)
        lens = torch.tensor([len(s.token_ids) for s in seqs], dtype=torch.int64)
        self._rows = torch.tensor(rows, dtype=torch.int64)
        self._nbs = (starts + lens + bs - 1) // bs
        self._ctx_nbs = (starts + bs - 1) // bs
        self._first = starts // bs
        host = self.tables.host[:, self._rows]  # [L, R]
        pinned = self.prompts.pin([s.request_id for s in seqs], starts.tolist(), lens.tolist(),
                                  [len(s.prompt_token_ids) + s.num_output_tokens for s in seqs], host)
        # A host layer's staged seqs sit end to end in its staging slot, in step order.
        sizes = self._nbs * (host & ~pinned)
        self._offsets = sizes.cumsum(1) - sizes  # [L, R]
        tok_seq = _seq_of_tokens(lens)
        tok_pos = torch.arange(int(lens.sum())) - (lens.cumsum(0) - lens)[tok_seq] + starts[tok_seq]
        tok_blk = tok_pos // bs
        dev = self.pools[Tier.DEVICE].device
        ids = self.tables.ids_dev[:, self._rows.to(dev)[tok_seq.to(dev)], tok_blk.to(dev)]  # [L, N]
        host_layers = host.any(1).nonzero().flatten().tolist()
        if host_layers:
            tok_host, tok_pin = host[:, tok_seq], pinned[:, tok_seq]
            staged = torch.where(tok_pin, tok_blk, self._offsets[:, tok_seq] + tok_blk)
            ids = torch.where(tok_host.to(dev), staged.to(dev), ids)
            for layer in host_layers:
                self._host_layers[layer] = self._host_layer(layer, host[layer], pinned[layer], tok_seq,
                                                            int(sizes[layer].sum()))
        self._order = host_layers
        self._host_step = host
        self._decodes = (lens == 1).nonzero().flatten()
        self._decode_lens = (starts + 1)[self._decodes].to(dev)
        self._decode_rows = self._rows[self._decodes].to(dev)
        self._tok_ids = ids
        self._tok_off = (tok_pos % bs).to(dev)

    def _host_layer(self, layer: int, host: torch.Tensor, pinned: torch.Tensor, tok_seq: torch.Tensor,
                    num_blocks: int) -> _HostLayer:
        """Index one host layer: its slot seqs, its pinned seqs, and where each new token goes."""
        slot = host & ~pinned
        pins = pinned.nonzero().flatten().tolist()
        if not pins and bool(host.all()):
            return _HostLayer(layer, slot.nonzero().flatten(), [], num_blocks, [(_SLOT, None)])
        dev = self.pools[Tier.DEVICE].device
        parts = [(where, mask[tok_seq].nonzero().flatten().to(dev))
                 for where, mask in ((_DEVICE, ~host), (_SLOT, slot)) if bool(mask.any())]
        parts += [(i, (tok_seq == i).nonzero().flatten().to(dev)) for i in pins]
        return _HostLayer(layer, slot.nonzero().flatten(), pins, num_blocks, parts)

    def before_layer(self, layer: int) -> None:
        """Issue prefetches up to `depth` host layers ahead of `layer`, then wait for its own."""
        while self._issued < issue_limit(self._order, layer, self.depth):
            self._prefetch(self._host_layers[self._order[self._issued]], self._issued % len(self._slots))
            self._issued += 1
        hl = self._host_layers.get(layer)
        jobs = [j for j in (self._move_jobs.pop(layer, None), hl.job_id if hl is not None else None)
                if j is not None]
        if jobs:
            self.engine.wait(max(jobs), layer)  # a wait covers every earlier job: the later one covers both

    def _prefetch(self, hl: _HostLayer, slot: int) -> None:
        hl.slot = slot
        buf = self._slots[slot]
        if self.slot_blocks is not None and hl.num_blocks > self.slot_blocks:
            raise RuntimeError(f"layer {hl.layer} stages {hl.num_blocks} blocks this step; a staging slot holds "
                               f"{self.slot_blocks} (the scheduler's staging budget was not kept)")
        if buf is None or buf.shape[0] < hl.num_blocks:
            size = hl.num_blocks if self.slot_blocks is None else self.slot_blocks
            self._slots[slot] = buf = self.engine.alloc_device((size, *self.row_shape), self.dtype)
        src, dst = self._spans(hl, torch.zeros_like(self._ctx_nbs), self._ctx_nbs)
        # Submitted even when empty (a prefill from position 0): waiting on it fences the slot
        # against the still-running write-back of the layer that used it before.
        hl.job_id = self.engine.submit(TransferJob(self.pools[Tier.HOST], buf, src, dst, Direction.H2D))

    def _spans(self, hl: _HostLayer, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(host block ids, slot block ids) of blocks lo[i]..hi[i] of each host seq i of the layer."""
        i = hl.seqs
        if i.numel() == 0:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        host_ids = _ranges(self.tables.ids[hl.layer, self._rows[i]], lo[i], hi[i])
        slots = self._offsets[hl.layer, i][:, None] + torch.arange(int(hi[i].max()))[None, :]
        return host_ids, _ranges(slots, lo[i], hi[i])

    def _tensor(self, layer: int, where: int) -> torch.Tensor:
        """The tensor that holds `layer` of this step's seqs at `where`: the device pool, the
        layer's staging slot, or seq `where`'s prompt buffer."""
        if where == _DEVICE:
            return self.pools[Tier.DEVICE]
        if where == _SLOT:
            return self._slots[self._host_layers[layer].slot]
        return self.prompts.buffer(self._seqs[where].request_id, layer)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new K/V [N, Hkv, D] of every seq of this step (flattened in step order) for
        `layer`: one scatter per tier the layer's seqs live on."""
        kv = torch.stack([k, v], 1)
        ids, off = self._tok_ids[layer], self._tok_off
        hl = self._host_layers.get(layer)
        if hl is None:
            scatter_tokens(self.pools[Tier.DEVICE], ids, off, kv)
        else:
            for where, toks in hl.parts:
                if toks is None:
                    scatter_tokens(self._tensor(layer, where), ids, off, kv)
                else:
                    scatter_tokens(self._tensor(layer, where), ids[toks], off[toks], kv[toks])

    def block_ids(self, layer: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tensor that holds seq i's KV of `layer` this step, its block ids there)."""
        hl = self._host_layers.get(layer)
        n = int(self._nbs[i])
        dev = self.pools[Tier.DEVICE].device
        if hl is not None and i in hl.pinned:
            return self._tensor(layer, i), torch.arange(n, device=dev)
        if hl is not None and bool(self.tables.host[layer, self._rows[i]]):
            first = int(self._offsets[layer, i])
            return self._tensor(layer, _SLOT), torch.arange(first, first + n, device=self.pools[Tier.DEVICE].device)
        return self.pools[Tier.DEVICE], self.tables.ids_dev[layer, int(self._rows[i]), :n]

    def decode_groups(self, layer: int) -> list[PagedGroup]:
        """This step's decode seqs (one new token each) for `layer`, by the tensor their KV is in:
        at most two groups (device pool, staging slot), each one batched attention call."""
        d = self._decodes
        if d.numel() == 0:
            return []
        if layer not in self._host_layers:
            return [PagedGroup(d, self.pools[Tier.DEVICE], self.tables.ids_dev[layer], self._decode_rows,
                               self._decode_lens)]
        on_host = self._host_step[layer, d]
        groups = []
        for host in (False, True):
            pick = (on_host == host).nonzero().flatten()
            if pick.numel() == 0:
                continue
            dev = self._decode_lens.device
            lens, seqs = self._decode_lens[pick.to(dev)], d[pick]
            if host:
                width = int(self._nbs[seqs].max())
                table = (self._offsets[layer, seqs][:, None] + torch.arange(width)[None, :]).to(dev)
                groups.append(PagedGroup(seqs, self._tensor(layer, _SLOT), table, None, lens))
            else:
                groups.append(PagedGroup(seqs, self.pools[Tier.DEVICE], self.tables.ids_dev[layer],
                                         self._decode_rows[pick.to(dev)], lens))
        return groups

    def read(self, layer: int, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Seq i's full K, V for `layer` as [1, Hkv, ctx + n, D], the layout SDPA takes, after
        `write`; k, v [n, Hkv, D] are its new tokens, returned as they are when nothing was cached."""
        seq = self._seqs[i]
        if seq.start_pos == 0:  # nothing cached before: attend on the new K/V, skip the gather
            return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        pool, ids = self.block_ids(layer, i)
        kv = gather_kv(pool, ids, seq.start_pos + k.shape[0])
        return kv[0].unsqueeze(0), kv[1].unsqueeze(0)

    def after_layer(self, layer: int) -> None:
        """Write the blocks this step touched back to host for every host seq of `layer`."""
        hl = self._host_layers.get(layer)
        if hl is None:
            return
        dst, src = self._spans(hl, self._first, self._nbs)
        self.engine.submit(TransferJob(self._slots[hl.slot], self.pools[Tier.HOST], src, dst, Direction.D2H))
        for i in hl.pinned:
            lo, hi = int(self._first[i]), int(self._nbs[i])
            rid = self._seqs[i].request_id
            job = self.engine.submit(TransferJob(
                self.prompts.buffer(rid, layer), self.pools[Tier.HOST], torch.arange(lo, hi),
                self.tables.ids[layer, int(self._rows[i]), lo:hi].clone(), Direction.D2H))
            self.prompts.wrote_back(rid, job)
