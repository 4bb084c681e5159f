"""The tier manager: which blocks, in which tier, hold each layer of each request.

It is the single owner of both block pools (one per tier). Every byte it reports is a block it has
handed out, so `used_bytes(tier) == blocks held by requests x block_bytes` at every step. The
executor (`kv/store.py`) only reads block tables and runs the step's MoveOps (`take_moves`).

A step's moves are one plan: at most one MoveOp per (request, layer), from where the layer's KV was
at the start of the step to where it is at the end, whatever happened in between. A layer moved to
device and back to host in one step gets its host blocks back and no copy (the copy to device would
run after the copy back to host reads the device blocks, which still hold nothing); a request freed
in the step takes its pending moves with it (their destinations may be handed out again at once).
"""

from __future__ import annotations

from orbitflow_ray.kv.blocks import BlockPool, LayerKV, MoveOp, Tier


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVTierManager:
    def __init__(self, num_layers: int, block_size: int, block_bytes: int,
                 device_blocks: int, host_blocks: int, staging_slot_blocks: int | None = None,
                 staging_blocks: int = 0) -> None:
        """staging_slot_blocks: the most blocks of one layer a step may stage for its host-resident
        layers (the scheduler keeps each step within it; None: no limit); staging_blocks: the device
        blocks reserved for staging beside the `device_blocks` of KV (reported, not allocated here)."""
        self.num_layers = num_layers
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.staging_slot_blocks = staging_slot_blocks
        self.staging_blocks = staging_blocks
        self.pools = {Tier.DEVICE: BlockPool(device_blocks), Tier.HOST: BlockPool(host_blocks)}
        self._tables: dict[str, list[LayerKV]] = {}
        # Host blocks of layers moved to device this step: the host -> device copy reads them later
        # in the step (per layer, overlapping compute), while device -> host copies run first, so
        # handing them out again this step could overwrite them before they are read.
        # (an ordered set: an undone move takes its blocks back in O(its blocks), not O(all held))
        self._moved_from_host: dict[int, None] = {}
        self._moves: dict[int, MoveOp] = {}  # this step's moves, in issue order (by id: O(1) to undo one)
        self._last_move: dict[tuple[str, int], MoveOp] = {}  # the latest of them per (request, layer)

    # ---- queries -------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

    def request_ids(self) -> list[str]:
        return list(self._tables)

    def check(self) -> None:
        """Raise AssertionError unless the accounting is exact: in each tier, the blocks held by
        tables (and, on host, those vacated by this step's moves to device) are distinct and are
        exactly the pool's used blocks; every layer's blocks sit in its own tier."""
        for tier, pool in self.pools.items():
            held = [b for t in self._tables.values() for lk in t if lk.tier == tier for b in lk.blocks]
            if tier == Tier.HOST:
                held += list(self._moved_from_host)
            if len(held) != len(set(held)):
                raise AssertionError(f"a {tier.name} block is held twice")
            if set(held) != pool.used_blocks():
                raise AssertionError(f"{tier.name} blocks held {len(held)} != used {pool.num_used}")

    def table(self, request_id: str) -> list[LayerKV]:
        return self._tables[request_id]

    def placement(self, request_id: str) -> list[Tier]:
        return [lk.tier for lk in self._tables[request_id]]

    def num_free(self, tier: Tier) -> int:
        return self.pools[tier].num_free

    def used_bytes(self, tier: Tier) -> int:
        return self.pools[tier].num_used * self.block_bytes

    def capacity_bytes(self, tier: Tier) -> int:
        return self.pools[tier].num_blocks * self.block_bytes

    def held_bytes(self, tier: Tier) -> int:
        """Bytes summed over requests' tables (and copies in flight): always equals used_bytes(tier)."""
        held = sum(len(lk.blocks) for t in self._tables.values() for lk in t if lk.tier == tier)
        return (held + (len(self._moved_from_host) if tier == Tier.HOST else 0)) * self.block_bytes

    def request_bytes(self, request_id: str) -> int:
        return sum(len(lk.blocks) for lk in self._tables[request_id]) * self.block_bytes

    def demand(self, placement: list[Tier], num_blocks_per_layer: int) -> dict[Tier, int]:
        need = {Tier.DEVICE: 0, Tier.HOST: 0}
        for tier in placement:
            need[tier] += num_blocks_per_layer
        return need

    def fits(self, need: dict[Tier, int]) -> bool:
        return all(self.pools[t].can_allocate(n) for t, n in need.items())

    # ---- actions -------------------------------------------------------------------------------
    def register(self, request_id: str, placement: list[Tier]) -> None:
        """Give a request an empty table with the given placement (no blocks yet)."""
        if request_id in self._tables:
            raise KeyError(f"request {request_id!r} already has KV")
        if len(placement) != self.num_layers:
            raise ValueError(f"placement has {len(placement)} layers, model has {self.num_layers}")
        self._tables[request_id] = [LayerKV(Tier(t), []) for t in placement]

    def growth_need(self, request_id: str, num_tokens: int) -> dict[Tier, int]:
        need = {Tier.DEVICE: 0, Tier.HOST: 0}
        target = self.blocks_for(num_tokens)
        for lk in self._tables[request_id]:
            need[lk.tier] += max(0, target - len(lk.blocks))
        return need

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Make every layer hold `num_tokens` tokens. All or nothing: False changes no state."""
        table = self._tables[request_id]
        if table and self.blocks_for(num_tokens) <= len(table[0].blocks):
            return True  # every layer holds the same number of blocks: nothing to add (most steps)
        if not self.fits(self.growth_need(request_id, num_tokens)):
            return False
        target = self.blocks_for(num_tokens)
        for lk in self._tables[request_id]:
            extra = target - len(lk.blocks)
            if extra > 0:
                lk.blocks.extend(self.pools[lk.tier].allocate(extra))
        return True

    def move(self, request_id: str, layer: int, dst: Tier) -> MoveOp | None:
        """Re-home one layer. Returns None (no state change) if the destination has no room, or
        if the layer's move to device earlier in this step is undone instead (no copy needed)."""
        lk = self._tables[request_id][layer]
        if lk.tier == dst:
            return None
        earlier = self._last_move.get((request_id, layer))
        if earlier is not None and earlier.src_tier == Tier.HOST:
            return self._undo_move_to_device(lk, earlier)
        new = self.pools[dst].allocate(len(lk.blocks))
        if new is None:
            return None
        src_tier, src_blocks = lk.tier, tuple(lk.blocks)
        if lk.tier == Tier.HOST:
            self._moved_from_host.update(dict.fromkeys(lk.blocks))  # freed at the step's end (release_moved)
        else:
            self.pools[lk.tier].free(lk.blocks)
        lk.tier, lk.blocks = dst, new
        # Device -> host -> device in one step keeps both copies: the executor runs every copy to
        # host before any copy to device, so the second reads what the first wrote.
        op = MoveOp(request_id, layer, src_tier, src_blocks, dst, tuple(new))
        self._moves[id(op)] = op
        self._last_move[(request_id, layer)] = op
        return op

    def _undo_move_to_device(self, lk: LayerKV, earlier: MoveOp) -> None:
        """Host -> device, then back to host within one step: the layer takes its host blocks
        back (still held, `_moved_from_host`), plus fresh ones for blocks it grew meanwhile, which
        hold no KV yet. The earlier copy is dropped; the device blocks are free again."""
        extra = len(lk.blocks) - len(earlier.src_blocks)
        grown = self.pools[Tier.HOST].allocate(extra) if extra > 0 else []
        if grown is None:
            return None
        self._unhold(earlier.src_blocks)
        self.pools[Tier.DEVICE].free(lk.blocks)
        lk.tier, lk.blocks = Tier.HOST, list(earlier.src_blocks) + grown
        del self._moves[id(earlier)]
        del self._last_move[(earlier.request_id, earlier.layer)]
        return None

    def take_moves(self) -> list[MoveOp]:
        """The step's moves in issue order (per layer one, or a copy to host then one back to
        device); the next step starts empty."""
        moves, self._moves, self._last_move = list(self._moves.values()), {}, {}
        return moves

    def move_request(self, request_id: str, placement: list[Tier]) -> list[MoveOp] | None:
        """Re-home all layers that change. All or nothing. Layers going to host move first: the
        device blocks they free count for the layers coming to device (the executor copies every
        device -> host move out before anything reuses its blocks, `KVStore.apply_moves`)."""
        table = self._tables[request_id]
        pairs = list(enumerate(zip(table, placement)))
        out = [i for i, (lk, t) in pairs if lk.tier == Tier.DEVICE and Tier(t) == Tier.HOST]
        into = [i for i, (lk, t) in pairs if lk.tier == Tier.HOST and Tier(t) == Tier.DEVICE]
        freed = sum(len(table[i].blocks) for i in out)
        if not (self.pools[Tier.HOST].can_allocate(freed)
                and self.pools[Tier.DEVICE].num_free + freed >= sum(len(table[i].blocks) for i in into)):
            return None
        ops = [self.move(request_id, i, Tier.HOST) for i in out] + [self.move(request_id, i, Tier.DEVICE)
                                                                    for i in into]
        return [op for op in ops if op is not None]

    def _unhold(self, blocks) -> list[int]:
        """Stop holding `blocks` for this step's copies to device; returns those that were held
        (`release_moved` may have freed the others already)."""
        held = [b for b in blocks if b in self._moved_from_host]
        for b in held:
            del self._moved_from_host[b]
        return held

    def release_moved(self) -> None:
        """The step's copies are done: host blocks vacated by moves to device are free again. Those
        moves can no longer be undone (`_undo_move_to_device` takes the host blocks back), so a
        later move of the layer back to host is a new copy, even before the next `take_moves`."""
        if self._moved_from_host:
            self.pools[Tier.HOST].free(list(self._moved_from_host))
            self._moved_from_host = {}
        self._last_move = {k: op for k, op in self._last_move.items() if op.src_tier != Tier.HOST}

    def free(self, request_id: str) -> None:
        """Release a request's blocks and drop its pending moves: their destinations are free
        again with the table; the host sources of its moves to device, held until the step's
        copies ran (`release_moved`), are freed now, since no copy will read them."""
        table = self._tables.pop(request_id, [])
        dropped = [op for op in self._moves.values() if op.request_id == request_id]
        if dropped:
            for op in dropped:
                del self._moves[id(op)]
            for layer in range(len(table)):
                self._last_move.pop((request_id, layer), None)
            unread = self._unhold([b for op in dropped if op.src_tier == Tier.HOST for b in op.src_blocks])
            if unread:
                self.pools[Tier.HOST].free(unread)
        for lk in table:
            self.pools[lk.tier].free(lk.blocks)
