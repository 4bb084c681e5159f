"""The model runner: executes one SchedulerOutput and returns the sampled tokens.

It never allocates KV: it reads block tables from the plan, runs the MoveOps, and lets the KV store
stream host-resident layers in while earlier layers compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbitflow_ray.kv.store import KVStore
from orbitflow_ray.model.llama import LlamaModel
from orbitflow_ray.model.sampler import sample
from orbitflow_ray.sched.output import SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlamaModel, store: KVStore) -> None:
        self.model = model
        self.store = store
        self.device = model.device
        s = model.spec
        self.scale = s.head_dim ** -0.5
        self._slices: list[tuple[int, int]] = []

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
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
        hidden = self.model.forward(torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device),
                                    self._attend, self.store.before_layer)
        sampling = [i for i, s in enumerate(out.seqs) if s.sample]
        if not sampling:
            return {}
        last = torch.tensor([self._slices[i][1] - 1 for i in sampling], device=self.device)
        logits = self.model.logits(hidden[last])
        tokens = sample(logits, [out.seqs[i] for i in sampling])
        return {out.seqs[i].request_id: t for i, t in zip(sampling, tokens)}

    def _mask(self, n: int, s: int) -> torch.Tensor | None:
        """The causal mask of n new queries over s keys, built once per step rather than per layer;
        None where SDPA needs none (one query) or takes is_causal (no cached context)."""
        if not 1 < n < s:
            return None
        return torch.arange(s, device=self.device)[None, :] <= torch.arange(s - n, s, device=self.device)[:, None]

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # One SDPA call per seq, never one padded batch: the CPU kernel's reduction order depends
        # on the batch shape (and thread count), and transformers attends one prompt at a time.
        self.store.write(layer, k, v)
        outs = []
        for i, (a, b) in enumerate(self._slices):
            keys, values = self.store.read(layer, i, k[a:b], v[a:b])
            outs.append(self._sdpa(q[a:b], keys, values, self._masks[i]))
        self.store.after_layer(layer)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        """Causal attention of n new queries [n, H, D] over keys/values [1, Hkv, ctx + n, D],
        shaped as transformers shapes it."""
        n, s = q.shape[0], keys.shape[2]
        qt = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        o = F.scaled_dot_product_attention(qt, keys, values, attn_mask=mask, is_causal=(n > 1 and n == s),
                                           scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1).reshape(n, -1)
