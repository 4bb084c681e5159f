"""TTFT, TBT and TPOT of one request from its token timestamps: the one definition.

Pure functions over a time-ordered sequence of seconds (one timestamp per output token, on any one
clock), so the lowest layers (`outputs.RequestMetrics`) can use them without importing the rest of
`orbitflow_ray.metrics`. Which timestamps are passed decides what is measured: release times (after
Token-Deposit pacing) for what a client sees, emission times for what the engine did.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def ttft_s(arrival_s: float, times: Sequence[float]) -> float | None:
    """Time to first token: the first timestamp minus the arrival; None before any token."""
    return times[0] - arrival_s if len(times) else None


def tbts_s(times: Sequence[float]) -> np.ndarray:
    """Times between consecutive tokens (len(times) - 1 gaps; empty for fewer than two tokens)."""
    return np.diff(np.asarray(times, dtype=float))


def tpot_s(times: Sequence[float]) -> float | None:
    """Time per output token after the first: the mean TBT (vLLM's definition); None below two tokens."""
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
