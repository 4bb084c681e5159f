"""Sampling: per sequence, edit the logits row (logit_bias, min_tokens, penalties), then choose a
token greedily or by temperature / top-k / top-p; report raw log-probabilities when asked.

The edits run in vLLM's order: logit_bias, then min_tokens (EOS and stop token ids get -inf until
min_tokens tokens exist), then repetition, frequency and presence penalties. A row whose request asks
for none of them is never touched, so greedy output without them is bit-identical to plain argmax.
Log-probabilities are taken before any edit and before temperature (vLLM's "raw_logprobs").

A seeded request draws from a generator seeded by (seed, output position), so its tokens do not
depend on batch composition or on being preempted and recomputed.
"""

from __future__ import annotations

import torch

from orbitflow_ray.outputs import TokenLogprobs
from orbitflow_ray.sampling_params import SamplingParams
from orbitflow_ray.kv.plan import ScheduledSeq

_LOGIT_CAP = 1e30  # x 1/temperature (at most 1e5, see SamplingParams.greedy) stays below float32's 3.4e38


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


def apply_logit_edits(row: torch.Tensor, sp: SamplingParams, prompt_ids: list[int],
                      output_ids: list[int]) -> torch.Tensor:
    """A float32 copy of one logits row [vocab] with sp's edits applied; `output_ids` are the tokens
    generated so far (the penalties' history; prompt_ids count for repetition_penalty only)."""
    row = row.float().clone()
    if sp.logit_bias:
        ids = torch.tensor(list(sp.logit_bias), dtype=torch.long, device=row.device)
        row[ids] += torch.tensor(list(sp.logit_bias.values()), dtype=row.dtype, device=row.device)
    if len(output_ids) < sp.min_tokens:
        banned = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(sp.eos_token_ids))
        if banned:
            row[torch.tensor(sorted(banned), dtype=torch.long, device=row.device)] = float("-inf")
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=row.device)
        if len(seen):
            vals = row[seen]
            # The row's dtype takes the penalty: one below float32's smallest normal (5e-324 is > 0,
            # so valid) would round to 0 there, and a token min_tokens banned (-inf) times 0 is NaN.
            penalty = max(sp.repetition_penalty, torch.finfo(row.dtype).tiny)
            row[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    if output_ids and (sp.frequency_penalty or sp.presence_penalty):
        ids, counts = torch.unique(torch.tensor(output_ids, dtype=torch.long, device=row.device), return_counts=True)
        row[ids] -= sp.frequency_penalty * counts.to(row.dtype) + sp.presence_penalty
    # A tiny repetition_penalty (5e-324 is > 0) divides a logit to +inf, and softmax over +inf is NaN:
    # the draw would raise and take the engine down. Capped where even 1/temperature keeps it finite.
    return row.clamp_(max=_LOGIT_CAP)


def token_logprobs(raw: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """The logprobs of `token` and of the k likeliest tokens, from one raw logits row [vocab]."""
    logp = torch.log_softmax(raw.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        vals, ids = torch.topk(logp, min(k, logp.shape[-1]))
        top = tuple(zip(ids.tolist(), vals.tolist()))
    return TokenLogprobs(token, float(logp[token]), top)


def sample(logits: torch.Tensor, seqs: list[ScheduledSeq]) -> list[int]:
    """One token per row of logits [num_seqs, vocab]; sets `seq.logprobs` where asked for."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for raw, seq, g in zip(logits, seqs, greedy):
        sp = seq.sampling_params
        row = raw
        if sp.changes_logits:
            row = apply_logit_edits(raw, sp, seq.prompt_token_ids, seq.output_token_ids[:seq.num_output_tokens])
            g = int(row.argmax())
        if sp.greedy:
            tok = g
        else:
            probs = _filtered_probs(row.float(), sp.temperature, sp.top_k, sp.top_p)
            gen = None
            if sp.seed is not None:
                gen = torch.Generator(device=probs.device)
                gen.manual_seed((sp.seed * 1_000_003 + seq.num_output_tokens) % (1 << 63))
            tok = int(torch.multinomial(probs, 1, generator=gen))
        if sp.logprobs is not None:
            seq.logprobs = token_logprobs(raw, tok, sp.logprobs)
        out.append(tok)
    return out
