"""The executor's own copy of every request's block tables, as tensors, updated by delta.

Each request holds a row: `ids[layer, row, j]` is the block id of its j-th block in that layer's tier
and `host[layer, row]` says that the tier is host. The plan's `TableDelta`s (`sched/table_deltas.py`)
write only what changed, so a step costs O(changes), not O(layers x blocks) (vLLM's
`BlockTable.append_row`). `ids` lives on the CPU (the transfer engine's index lists read it);
`ids_dev` mirrors it where attention reads it (the same tensor on the cpu backend).
"""

from __future__ import annotations

import torch

from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.kv.plan import ScheduledSeq


class BlockTables:
    def __init__(self, num_layers: int, device: torch.device, rows: int = 8, blocks: int = 64) -> None:
        self.num_layers = num_layers
        self.device = device
        self.rows: dict[str, int] = {}
        self._free_rows: list[int] = []
        self.ids = torch.zeros(num_layers, rows, blocks, dtype=torch.int64)
        self.host = torch.zeros(num_layers, rows, dtype=torch.bool)
        self.ids_dev = self.ids if device.type == "cpu" else self.ids.to(device)

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            row = self.rows.pop(rid, None)
            if row is not None:
                self._free_rows.append(row)

    def update(self, seqs: list[ScheduledSeq]) -> list[int]:
        """Apply every seq's table deltas (one indexed write for all of them); returns their rows."""
        rows, lay, row_ix, col, val, tiers = [], [], [], [], [], []
        need_blocks = 0
        for seq in seqs:
            row = self._row(seq)
            rows.append(row)
            for d in seq.table_deltas:
                n = len(d.blocks)
                lay.extend([d.layer] * n)
                row_ix.extend([row] * n)
                col.extend(range(d.start, d.start + n))
                val.extend(d.blocks)
                need_blocks = max(need_blocks, d.start + n)
                tiers.append((d.layer, row, d.tier == Tier.HOST))
        self._reserve(len(self.rows) + len(self._free_rows), need_blocks)
        if tiers:
            t = torch.tensor(tiers, dtype=torch.int64)
            self.host[t[:, 0], t[:, 1]] = t[:, 2].bool()
        if val:
            index = (torch.tensor(lay), torch.tensor(row_ix), torch.tensor(col))
            values = torch.tensor(val, dtype=torch.int64)
            self.ids[index] = values
            if self.ids_dev is not self.ids:
                self.ids_dev[tuple(i.to(self.device) for i in index)] = values.to(self.device)
        return rows

    def _row(self, seq: ScheduledSeq) -> int:
        row = self.rows.get(seq.request_id)
        if row is not None:
            return row
        if any(d.start for d in seq.table_deltas) or len(seq.table_deltas) != self.num_layers:
            raise RuntimeError(f"{seq.request_id}: the first plan with this request must carry its whole "
                               "table (a plan was skipped, or a forgotten request's deltas came late)")
        row = self._free_rows.pop() if self._free_rows else len(self.rows)
        self.rows[seq.request_id] = row
        return row

    def _reserve(self, rows: int, blocks: int) -> None:
        """Grow the tensors (doubling) to hold `rows` rows of `blocks` blocks."""
        r, b = self.ids.shape[1], self.ids.shape[2]
        if rows <= r and blocks <= b:
            return
        while r < rows:
            r *= 2
        while b < blocks:
            b *= 2
        ids = torch.zeros(self.num_layers, r, b, dtype=torch.int64)
        ids[:, :self.ids.shape[1], :self.ids.shape[2]] = self.ids
        host = torch.zeros(self.num_layers, r, dtype=torch.bool)
        host[:, :self.host.shape[1]] = self.host
        self.ids, self.host = ids, host
        self.ids_dev = ids if self.device.type == "cpu" else ids.to(self.device)
