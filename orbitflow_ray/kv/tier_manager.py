"""The tier manager: which blocks, in which tier, hold each layer of each request.

It is the single owner of both block pools (one per tier). Every byte it reports is a block it has
handed out, so `used_bytes(tier) == blocks held by requests x block_bytes` at every step. The
executor (`kv/store.py`) only reads block tables and runs the MoveOps it returns.
"""

from __future__ import annotations

from orbitflow_ray.kv.blocks import BlockPool, LayerKV, MoveOp, Tier


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVTierManager:
    def __init__(self, num_layers: int, block_size: int, block_bytes: int,
                 device_blocks: int, host_blocks: int) -> None:
        self.num_layers = num_layers
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.pools = {Tier.DEVICE: BlockPool(device_blocks), Tier.HOST: BlockPool(host_blocks)}
        self._tables: dict[str, list[LayerKV]] = {}
        # Host blocks of layers moved to device this step: the host -> device copy reads them later
        # in the step (per layer, overlapping compute), while device -> host copies run first, so
        # handing them out again this step could overwrite them before they are read.
        self._moved_from_host: list[int] = []

    # ---- queries -------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

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
        """Re-home one layer. Returns None (no state change) if the destination has no room."""
        lk = self._tables[request_id][layer]
        if lk.tier == dst:
            return None
        new = self.pools[dst].allocate(len(lk.blocks))
        if new is None:
            return None
        op = MoveOp(request_id, layer, lk.tier, tuple(lk.blocks), dst, tuple(new))
        if lk.tier == Tier.HOST:
            self._moved_from_host.extend(lk.blocks)  # freed at the step's end (release_moved)
        else:
            self.pools[lk.tier].free(lk.blocks)
        lk.tier, lk.blocks = dst, new
        return op

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

    def release_moved(self) -> None:
        """The step's copies are done: host blocks vacated by moves to device are free again."""
        if self._moved_from_host:
            self.pools[Tier.HOST].free(self._moved_from_host)
            self._moved_from_host = []

    def free(self, request_id: str) -> None:
        for lk in self._tables.pop(request_id, []):
            self.pools[lk.tier].free(lk.blocks)
