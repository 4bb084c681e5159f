"""What changed in each scheduled request's block tables since the last plan that carried it.

The executor keeps its own copy of every block table (`kv/block_table.py`) and applies these deltas,
so neither side copies a whole table per step (vLLM's `new_block_ids`). The tier manager grows a
layer's block list in place (append only) and gives it a new list whenever it rewrites it (a move to
the other tier, an undone move, a recompute), so per layer a list identity and a length say what
the executor has: equal identity, longer list -> the appended blocks; another list -> all of it.
Cost per request per step: O(layers), plus the blocks that changed.
"""

from __future__ import annotations

from orbitflow_ray.kv.blocks import LayerKV, Tier
from orbitflow_ray.kv.plan import TableDelta


class TableTracker:
    def __init__(self) -> None:
        # request id -> per layer (the block list sent, its length then, its tier then)
        self._sent: dict[str, list[tuple[list[int] | None, int, Tier | None]]] = {}

    def deltas(self, request_id: str, table: list[LayerKV]) -> list[TableDelta]:
        """The deltas that bring the executor's copy of `table` up to date; records them as sent."""
        sent = self._sent.get(request_id)
        if sent is None or len(sent) != len(table):
            sent = self._sent[request_id] = [(None, 0, None)] * len(table)
        out = []
        # most steps change no layer (a new block every block_size tokens): find the changed ones first
        changed = [layer for layer, (lk, (blocks, n, tier)) in enumerate(zip(table, sent))
                   if not (blocks is lk.blocks and n == len(blocks) and tier is lk.tier)]
        for layer in changed:
            lk = table[layer]
            blocks, n, tier = sent[layer]
            if blocks is lk.blocks and tier is lk.tier:
                if n == len(blocks):
                    continue
                start = n
            else:
                start = 0
            out.append(TableDelta(layer, lk.tier, start, tuple(lk.blocks[start:])))
            sent[layer] = (lk.blocks, len(lk.blocks), lk.tier)
        return out

    def forget(self, request_ids: list[str]) -> None:
        """The executor dropped these requests: their next deltas (a reused id) start from 0."""
        for rid in request_ids:
            self._sent.pop(rid, None)
