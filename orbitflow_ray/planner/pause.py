"""Pause-Resume victim choice: which in-flight request to pause when no placement fits.

`largest` (the paper's choice) frees the most device KV per pause, so the fewest requests wait;
`shortest` and `random` exist for the ablation. Strategies see request views and return one id.
"""

from __future__ import annotations

import random
from typing import Callable

from orbitflow_ray.planner.base import RequestView

PauseStrategy = Callable[[list[RequestView], random.Random], str]


def _largest(cands: list[RequestView], rng: random.Random) -> str:
    # Ties go to the newest arrival: it has waited least so far.
    return max(cands, key=lambda v: (v.num_tokens, v.arrival_time)).request_id


def _shortest(cands: list[RequestView], rng: random.Random) -> str:
    return min(cands, key=lambda v: (v.num_tokens, -v.arrival_time)).request_id


def _random(cands: list[RequestView], rng: random.Random) -> str:
    return rng.choice(cands).request_id


PAUSE_STRATEGIES: dict[str, PauseStrategy] = {"largest": _largest, "shortest": _shortest, "random": _random}


def pause_strategy(name: str) -> PauseStrategy:
    if name not in PAUSE_STRATEGIES:
        raise ValueError(f"unknown pause_strategy {name!r}; choose one of {sorted(PAUSE_STRATEGIES)}")
    return PAUSE_STRATEGIES[name]
