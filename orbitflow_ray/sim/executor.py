"""The simulator's executor: times a `SchedulerOutput` the way the engine would run it.

It mirrors `ModelRunner` + `KVStore` step for step, with a roofline in place of the model:
1. placement moves as `KVStore.apply_moves` runs them: device -> host in one job, waited for;
   host -> device one job per layer, waited for only before that layer computes;
2. layer by layer: prefetches of host-resident layers are issued `prefetch_depth` host layers
   ahead onto one FIFO link, a host layer waits for its own prefetch (the stall), computes, and
   queues the write-back of the blocks it touched (not waited for);
3. the LM head and sampling.
The link is one FIFO queue that carries over from step to step, so a write-back still in flight
delays the next step's prefetches exactly as the CPU transfer engine orders them (the CUDA engine
gives each direction its own stream, so there this queue is the conservative, half-duplex bound).
"""

from __future__ import annotations

from collections.abc import Callable

from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.kv.plan import SchedulerOutput, StepResult
from orbitflow_ray.kv.prefetch import issue_limit
from orbitflow_ray.kv.tier_manager import cdiv


class SimExecutor:
    def __init__(self, roofline, block_size: int, prefetch_depth: int = 1,
                 clock: Callable[[], float] = lambda: 0.0) -> None:
        """clock: the virtual time a step starts at (the simulator's clock)."""
        self.roofline = roofline
        self.clock = clock
        self.block_size = block_size
        self.depth = prefetch_depth
        self.block_bytes = roofline.kv_bytes_per_token_per_layer * block_size
        self.link_free_at = 0.0  # absolute time, carried across steps

    def _link(self, now: float, nbytes: int) -> tuple[float, float]:
        """Queue a copy at `now`; returns (its end time, link seconds it took)."""
        busy = self.roofline.transfer_s(nbytes)
        self.link_free_at = max(self.link_free_at, now) + busy
        return self.link_free_at, busy

    def execute(self, out: SchedulerOutput) -> StepResult:
        """The step's predicted wall and stall seconds and link traffic; every sampling seq gets
        token 0 (the simulator runs no model)."""
        start = self.clock()
        sampled = {s.request_id: 0 for s in out.seqs if s.sample}
        now, h2d, d2h, busy_in = start, 0, 0, 0.0
        # 1. moves: out of the device first, waited for; into the device per layer, in flight
        n_out = sum(len(op.src_blocks) for op in out.moves if op.dst_tier == Tier.HOST)
        if n_out:
            now, _ = self._link(now, n_out * self.block_bytes)
            d2h += n_out * self.block_bytes
        into: dict[int, int] = {}
        for op in out.moves:
            if op.dst_tier == Tier.DEVICE:
                into[op.layer] = into.get(op.layer, 0) + len(op.src_blocks)
        ready: dict[int, float] = {}
        for layer in sorted(into):
            ready[layer], busy = self._link(now, into[layer] * self.block_bytes)
            h2d, busy_in = h2d + into[layer] * self.block_bytes, busy_in + busy
        stall = now - start
        seqs = out.seqs
        if not seqs:
            now = max([now, *ready.values()])
            return StepResult(sampled, now - start, now - start, h2d, d2h, busy_in)
        ctx = sum(s.start_pos for s in seqs)
        new = sum(len(s.token_ids) for s in seqs)
        layer_s = self.roofline.layer_time_s(ctx, new, len(seqs))
        num_layers = len(seqs[0].table)
        # per host layer: bytes to bring in (cached context) and to write back (touched blocks)
        bring_blocks: dict[int, int] = {}
        back_blocks: dict[int, int] = {}
        for s in seqs:
            host = [layer for layer, lk in enumerate(s.table) if lk.tier == Tier.HOST]
            if not host:
                continue
            bring = cdiv(s.start_pos, self.block_size)
            back = cdiv(s.start_pos + len(s.token_ids), self.block_size) - s.start_pos // self.block_size
            for layer in host:
                bring_blocks[layer] = bring_blocks.get(layer, 0) + bring
                back_blocks[layer] = back_blocks.get(layer, 0) + back
        loads = {layer: (bring_blocks[layer] * self.block_bytes, back_blocks[layer] * self.block_bytes)
                 for layer in bring_blocks if bring_blocks[layer] or back_blocks[layer]}
        order = sorted(loads)
        moved = dict(ready)  # layer -> when its move into the device lands
        ready = {}
        if not order and not moved:  # a pure-compute step
            for _ in range(num_layers):
                now += layer_s
            return self._finish(out, sampled, start, now, stall, h2d, d2h, busy_in, new)
        issued = 0
        for layer in range(num_layers):
            while issued < len(order) and issued < issue_limit(order, layer, self.depth):
                h = order[issued]
                ready[h], busy = self._link(now, loads[h][0])
                h2d, busy_in = h2d + loads[h][0], busy_in + busy
                issued += 1
            due = max(ready.get(layer, now), moved.get(layer, now))
            if due > now:
                stall += due - now
                now = due
            now += layer_s
            if layer in loads:
                self._link(now, loads[layer][1])
                d2h += loads[layer][1]
        return self._finish(out, sampled, start, now, stall, h2d, d2h, busy_in, new)

    def _finish(self, out: SchedulerOutput, sampled: dict[str, int], start: float, now: float, stall: float,
                h2d: int, d2h: int, busy_in: float, new: int) -> StepResult:
        """The LM head and sampling, then the copies' share of compute."""
        now += self.roofline.head_time_s(sum(1 for s in out.seqs if s.sample), new)
        now += (h2d + d2h) * self.roofline.gpu.copy_compute_s_per_byte
        return StepResult(sampled, now - start, stall, h2d, d2h, busy_in)
