"""The model runner: executes one SchedulerOutput and returns a StepResult (the sampled tokens and
what the step measured: wall and stall seconds, bytes and link seconds each way).

It never allocates KV: it reads block tables from the plan, runs the MoveOps, and lets the KV store
stream host-resident layers in while earlier layers compute.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from orbitflow_kernels import Direction
from orbitflow_kernels.attention import paged_decode_attention
from orbitflow_kernels.cpu_prefill import prefill_attention

from orbitflow_ray.kv.plan import SchedulerOutput, StepResult
from orbitflow_ray.kv.store import KVStore
from orbitflow_ray.model.llama import LlamaModel
from orbitflow_ray.model.sampler import sample


def _delta(after: dict[Direction, float], before: dict[Direction, float], d: Direction) -> float:
    return after.get(d, 0) - before.get(d, 0)


class ModelRunner:
    def __init__(self, model: LlamaModel, store: KVStore) -> None:
        self.model = model
        self.store = store
        self.device = model.device
        s = model.spec
        self.scale = s.head_dim ** -0.5
        self._slices: list[tuple[int, int]] = []
        # Batched decode attention over the paged pool (one call per layer and tier group); the
        # bench swaps in a null one. Prefill chunks attend one call per seq (see _attend): on the
        # CPU `cpu_prefill.prefill_attention` (its C++ flash loop; impl="torch": SDPA, as
        # transformers runs it), on CUDA SDPA (`_sdpa`).
        self.attention = paged_decode_attention
        self.prefill_attention = prefill_attention
        # False: decodes too attend one call per seq after a gather, as prefill chunks do (the
        # baseline benches compare to).
        self.batched_decode = True
        # False on tensor-parallel shards other than rank 0: they compute their slice of every
        # layer but leave the (replicated) LM head and sampling to rank 0.
        self.samples = True
        self._seen: tuple[dict, dict] = ({}, {})  # the link counters at the last step's report

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one plan. Bytes and link seconds are those of copies that completed since the last
        step's report (`TransferEngine.bytes_moved` / `busy_seconds`: a write-back that lands after
        a step ends counts in the next), so the steps' figures add up to the engine's counters;
        stall is what the KV store waited for in this step."""
        t0 = time.perf_counter()
        sampled = self._execute(out)
        link = self.store.engine
        (moved0, busy0), (moved, busy) = self._seen, (link.bytes_moved, link.busy_seconds)
        self._seen = moved, busy
        return StepResult(sampled, time.perf_counter() - t0, self.store.last_stall_s,
                          _delta(moved, moved0, Direction.H2D), _delta(moved, moved0, Direction.D2H),
                          _delta(busy, busy0, Direction.H2D), _delta(busy, busy0, Direction.D2H))

    @torch.inference_mode()
    def _execute(self, out: SchedulerOutput) -> dict[str, int]:
        self.store.apply_moves(out.moves)
        self.store.forget(out.finished_request_ids)
        if not out.seqs:
            return {}
        ids, pos, self._slices, self._masks = [], [], [], []
        for seq in out.seqs:
            self._slices.append((len(ids), len(ids) + len(seq.token_ids)))
            ids.extend(seq.token_ids)
            pos.extend(range(seq.start_pos, seq.start_pos + len(seq.token_ids)))
            self._masks.append(self._mask(len(seq.token_ids), seq.start_pos + len(seq.token_ids)))
        self.store.begin_step(out.seqs)
        self._prefills = [i for i, seq in enumerate(out.seqs) if len(seq.token_ids) > 1 or not self.batched_decode]
        # token index of each decode seq (its slice start), for the batched decode path
        self._tok_of_seq = torch.tensor([a for a, _ in self._slices], dtype=torch.int64)
        hidden = self.model.forward(torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device),
                                    self._attend, self.store.before_layer)
        sampling = [i for i, s in enumerate(out.seqs) if s.sample]
        if not sampling or not self.samples:
            return {}
        last = torch.tensor([self._slices[i][1] - 1 for i in sampling], device=self.device)
        logits = self.model.logits(hidden[last])
        tokens = sample(logits, [out.seqs[i] for i in sampling])
        return {out.seqs[i].request_id: t for i, t in zip(sampling, tokens)}

    def _mask(self, n: int, s: int) -> torch.Tensor | None:
        """The causal mask of n new queries over s keys, built once per step rather than per layer;
        None where SDPA needs none (one query) or takes is_causal (no cached context), and on the
        CPU, whose prefill takes `cpu_prefill.prefill_attention`."""
        if not 1 < n < s or self.device.type != "cuda":
            return None
        return torch.arange(s, device=self.device)[None, :] <= torch.arange(s - n, s, device=self.device)[:, None]

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Decodes: one batched paged-attention call per tier group, reading the pool in place.
        # Prefill chunks: one call per seq, never one padded batch, so a prompt's bits do not depend
        # on the batch around it (transformers too attends one prompt at a time).
        self.store.write(layer, k, v)
        groups = self.store.decode_groups(layer) if self.batched_decode else []
        if not self._prefills and len(groups) == 1 and len(groups[0].seqs) == q.shape[0]:
            g = groups[0]  # every seq decodes from one tensor: tokens are the seqs, in order
            o = self.attention(q, g.pool, g.table, g.seq_lens, self.scale, g.rows)
            self.store.after_layer(layer)
            return o.reshape(q.shape[0], -1)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        for g in groups:
            toks = self._tok_of_seq[g.seqs].to(q.device)
            out[toks] = self.attention(q[toks], g.pool, g.table, g.seq_lens, self.scale, g.rows).flatten(1)
        for i in self._prefills:
            a, b = self._slices[i]
            keys, values = self.store.read(layer, i, k[a:b], v[a:b])
            if q.is_cuda:
                out[a:b] = self._sdpa(q[a:b], keys, values, self._masks[i])
            else:
                self.prefill_attention(q[a:b], keys[0], values[0], self.scale,
                                       out=out[a:b].view(b - a, *q.shape[1:]))
        self.store.after_layer(layer)
        return out

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        """Causal attention of n new queries [n, H, D] over keys/values [1, Hkv, ctx + n, D] on CUDA,
        shaped as transformers shapes it."""
        n, s = q.shape[0], keys.shape[2]
        qt = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        o = F.scaled_dot_product_attention(qt, keys, values, attn_mask=mask, is_causal=(n > 1 and n == s),
                                           scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1).reshape(n, -1)
