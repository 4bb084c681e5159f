"""Routing by predicted SLO feasibility: rank workers by the damage the planner predicts a new
request would do there.

Pure functions over the stats each worker reports (`WorkerCore.routing_stats`), so the Ray
request router is a thin shim and this is tested without Ray. Ranks, not a single pick: Serve
then chooses within the best rank by queue length and falls back to the next rank when every
replica of a rank is full, which keeps its backpressure and failure handling.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping


def predicted_damage(stats: Mapping, prompt_tokens: int) -> float | None:
    """SLO misses the planner predicts if a request of `prompt_tokens` joined; None: no advice."""
    probes, damage = stats.get("probe_tokens"), stats.get("damage")
    if not probes or not damage or len(probes) != len(damage):
        return None
    for n, d in zip(probes, damage):
        if prompt_tokens <= n:
            return float(d)
    return float(damage[-1])


def rank_workers(candidates: Mapping[Hashable, Mapping], prompt_tokens: int | None) -> list[list[Hashable]]:
    """Group candidates into ranks, best first.

    Key: (infeasible now, predicted added misses, known or not, queued + running requests). A worker
    with no advice yet (just started) ranks with the advised ones of zero damage but after them,
    so a fresh replica gets work without being preferred blindly. Equal keys share a rank.
    """
    keyed = []
    for cid, stats in candidates.items():
        d = predicted_damage(stats, prompt_tokens) if prompt_tokens is not None else None
        load = int(stats.get("running", 0)) + int(stats.get("waiting", 0))
        if d is None:
            key = (0, 0.0, 1, load)
        else:
            key = (1 if math.isinf(d) else 0, 0.0 if math.isinf(d) else d, 0, load)
        keyed.append((key, cid))
    keyed.sort(key=lambda kc: kc[0])
    ranks: list[list[Hashable]] = []
    last = None
    for key, cid in keyed:
        if key != last:
            ranks.append([])
            last = key
        ranks[-1].append(cid)
    return ranks
