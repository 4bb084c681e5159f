"""A linear per-layer compute model plus a link bandwidth, and its online least-squares fit.

Per layer, one step computes in c = a + b * (context tokens the batch attends over) + p * (new
tokens the step computes): a is the fixed cost of a layer (weights read, kernel launches), b the
attention cost per cached token, p the per-token cost of the linears (prefill chunks make it
matter). A decode step with no offloaded layer takes L * c; offloaded layers add the stalls that
`planner/problem.py` derives from the link bandwidth. Why linear: decode attention is memory-bound
and linear in context, the linears are linear in tokens, and three numbers fit from a handful of
steps, so the model adapts within seconds of a load change.

The online fit uses only steps with no host transfers for (a, b, p) (their time is pure compute),
and transfer timings for the bandwidth; both are rolling windows so the model follows drift
(thermal throttling, a noisy neighbour, a different GPU clock).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import nnls


@dataclass(frozen=True, slots=True)
class CostModel:
    num_layers: int
    compute_a_s: float  # per layer, fixed
    compute_b_s_per_token: float  # per layer, per cached context token
    compute_p_s_per_token: float  # per layer, per newly computed token
    link_bytes_per_s: float  # host -> device
    # Of a decode step's L * a, the seconds that run after the last layer (LM head, sampling, step
    # overhead): no copy to a layer overlaps them (`problem.engine_step_time`). 0: unknown.
    step_tail_s: float = 0.0

    def __post_init__(self) -> None:
        if self.num_layers < 1 or not self.compute_a_s > 0 or not self.link_bytes_per_s > 0:
            raise ValueError("need num_layers >= 1, compute_a_s > 0 and link_bytes_per_s > 0")
        if not self.step_tail_s >= 0:
            raise ValueError(f"step_tail_s must be >= 0, got {self.step_tail_s}")
        if self.compute_b_s_per_token < 0 or self.compute_p_s_per_token < 0:
            raise ValueError("per-token compute costs must be >= 0")

    def layer_s(self, context_tokens: int, new_tokens: int) -> float:
        return (self.compute_a_s + self.compute_b_s_per_token * context_tokens
                + self.compute_p_s_per_token * new_tokens)

    def compute_step_s(self, context_tokens: int, new_tokens: int) -> float:
        """A step with every layer on device: no stalls."""
        return self.num_layers * self.layer_s(context_tokens, new_tokens)

    def decode_layer_coeffs(self, batch_size: int) -> tuple[float, float]:
        """(a', b) such that a decode step of `batch_size` requests computes a layer in
        a' + b * context tokens: the planner's form (one new token per request)."""
        return self.compute_a_s + self.compute_p_s_per_token * batch_size, self.compute_b_s_per_token

    def transfer_s(self, nbytes: int) -> float:
        return nbytes / self.link_bytes_per_s


@dataclass(frozen=True, slots=True)
class StepSample:
    """What one executed step measured."""

    wall_s: float
    context_tokens: int  # KV tokens attended over (all scheduled requests, before this step)
    new_tokens: int  # tokens computed this step
    h2d_bytes: int = 0  # host -> device bytes this step waited on (0: a pure-compute step)
    h2d_busy_s: float = 0.0  # link time those bytes took, when the backend measures it
    stall_s: float | None = None  # time compute waited on transfers, when the runner measures it


def default_prior(num_layers: int, link_bytes_per_s: float | None, backend: str) -> CostModel:
    """Where the fit starts: a small model's layer on a CPU; the link as configured, else PCIe 4
    x16 (~25 GB/s) on CUDA or memcpy speed (~10 GB/s) on the CPU backend."""
    link = link_bytes_per_s or (25e9 if backend == "cuda" else 10e9)
    return CostModel(num_layers, compute_a_s=1e-3, compute_b_s_per_token=2e-8,
                     compute_p_s_per_token=1e-5, link_bytes_per_s=link)


class OnlineCostModel:
    """Rolling least-squares fit of a CostModel. `model` is the prior until enough samples arrive."""

    def __init__(self, prior: CostModel, window: int = 64, min_samples: int = 8) -> None:
        if window < min_samples or min_samples < 3:
            raise ValueError("need window >= min_samples >= 3")
        self.model = prior
        self.min_samples = min_samples
        # compute samples, oldest first: rows (1, context tokens, new tokens) and seconds per layer,
        # kept as arrays (rebuilding them from tuples every step cost more than the fit)
        self._X = np.empty((window, 3))
        self._y = np.empty(window)
        self._num_compute = 0
        self._link: deque[tuple[int, float]] = deque(maxlen=window)
        self.num_fits = 0

    def observe(self, s: StepSample) -> None:
        if s.new_tokens <= 0 or s.wall_s <= 0:
            return
        if s.h2d_bytes == 0 or s.stall_s is not None:
            compute_s = s.wall_s - (s.stall_s or 0.0)
            n = self._num_compute
            if n == len(self._y):  # full: drop the oldest
                self._X[:-1], self._y[:-1] = self._X[1:], self._y[1:]
                n -= 1
            self._X[n] = (1.0, s.context_tokens, s.new_tokens)
            self._y[n] = compute_s / self.model.num_layers
            self._num_compute = n + 1
        if s.h2d_bytes > 0 and s.h2d_busy_s > 0:
            self._link.append((s.h2d_bytes, s.h2d_busy_s))
        self._refit()

    def _refit(self) -> None:
        m = self.model
        if self._num_compute >= self.min_samples:
            X = self._X[:self._num_compute]
            # Scale columns so nnls is well conditioned (tokens are 1e0..1e5, seconds 1e-5..1e-1).
            scale = np.maximum(X.max(0), 1.0)
            coef, _ = nnls(X / scale, self._y[:self._num_compute])
            a, b, p = coef / scale
            if a > 0:
                m = replace(m, compute_a_s=float(a), compute_b_s_per_token=float(b),
                            compute_p_s_per_token=float(p))
        if len(self._link) >= 3:
            nbytes, secs = np.array(self._link).sum(0)
            m = replace(m, link_bytes_per_s=float(nbytes / secs))
        if m is not self.model:
            self.model = m
            self.num_fits += 1
