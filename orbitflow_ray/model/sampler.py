"""Greedy and temperature / top-k / top-p sampling.

A seeded request draws from a generator seeded by (seed, output position), so its tokens do not
depend on batch composition or on being preempted and recomputed.
"""

from __future__ import annotations

import torch

from orbitflow_ray.sched.output import ScheduledSeq


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, -1) - sorted_p < top_p
        keep[0] = True  # the top token always stays (a top_p below float32's range rounds to 0)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, keep)
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, seqs: list[ScheduledSeq]) -> list[int]:
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, seq, g in zip(logits, seqs, greedy):
        sp = seq.sampling_params
        if sp.greedy:
            out.append(g)
            continue
        probs = _filtered_probs(row.float(), sp.temperature, sp.top_k, sp.top_p)
        gen = None
        if sp.seed is not None:
            gen = torch.Generator(device=probs.device)
            gen.manual_seed((sp.seed * 1_000_003 + seq.num_output_tokens) % (1 << 63))
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out
