"""A linear per-layer compute model plus a link bandwidth, and its online least-squares fit.

Per layer, one step computes in c = a + b * (context tokens the batch attends over) + p * (new
tokens the step computes): a is the fixed cost of a layer (weights read, kernel launches), b the
attention cost per cached token, p the per-token cost of the linears (prefill chunks make it
matter). A decode step with no offloaded layer takes L * c; offloaded layers add the stalls that
`planner/problem.py` derives from the link bandwidth. Why linear: decode attention is memory-bound
and linear in context, the linears are linear in tokens, and three numbers fit from a handful of
steps, so the model adapts within seconds of a load change.

Copies cost compute time too where the copy engine shares the compute's cores (the CPU backend):
each byte a step copies, in or out, adds `copy_compute_s_per_byte` to it (0 on a GPU, whose DMA
engines copy). The online fit takes (a, b, p) and that per-byte cost from every step whose stall it
knows (the stall taken off: what is left is compute), and the bandwidth from transfer timings; both
are rolling windows so the model follows drift (thermal throttling, a noisy neighbour, a different
GPU clock). The fit moves a coefficient from the prior only as far as the window's steps tell it
apart from the others (`OnlineCostModel._refit`), so a good prior (`prior.engine_prior`: the
simulator's roofline of the device, calibrated) prices what the window has not seen yet: a second
request's context, the first offloaded step.
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
    # Compute seconds each byte a step copies (in and out) adds to it: 0 where DMA engines copy
    # (a GPU); on the CPU backend the copy thread shares the cores with the compute, and the host
    # layers' bookkeeping grows with them (`GpuSpec.copy_compute_s_per_byte`, which the simulator
    # charges; `bench/offload_step.py` measures it in the engine).
    copy_compute_s_per_byte: float = 0.0

    def __post_init__(self) -> None:
        if self.num_layers < 1 or not self.compute_a_s > 0 or not self.link_bytes_per_s > 0:
            raise ValueError("need num_layers >= 1, compute_a_s > 0 and link_bytes_per_s > 0")
        if not self.step_tail_s >= 0:
            raise ValueError(f"step_tail_s must be >= 0, got {self.step_tail_s}")
        if not self.copy_compute_s_per_byte >= 0:
            raise ValueError(f"copy_compute_s_per_byte must be >= 0, got {self.copy_compute_s_per_byte}")
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
    d2h_bytes: int = 0  # device -> host bytes completed this step (write-backs, moves out)


def default_prior(num_layers: int, link_bytes_per_s: float | None, backend: str) -> CostModel:
    """Where the fit starts: a small model's layer on a CPU; the link as configured, else PCIe 4
    x16 (~25 GB/s) on CUDA or memcpy speed (~10 GB/s) on the CPU backend."""
    link = link_bytes_per_s or (25e9 if backend == "cuda" else 10e9)
    return CostModel(num_layers, compute_a_s=1e-3, compute_b_s_per_token=2e-8,
                     compute_p_s_per_token=1e-5, link_bytes_per_s=link)


class OnlineCostModel:
    """Rolling least-squares fit of a CostModel, anchored at the prior (`_refit`). `model` is the
    prior until `min_samples` steps arrive. `rcond`: the smallest singular value, relative to the
    largest, of a direction the fit moves from the prior."""

    def __init__(self, prior: CostModel, window: int = 64, min_samples: int = 8, rcond: float = 0.02,
                 fits_copy_compute: bool | None = None) -> None:
        if window < min_samples or min_samples < 3:
            raise ValueError("need window >= min_samples >= 3")
        if not 0 < rcond < 1:
            raise ValueError(f"rcond must be in (0, 1), got {rcond}")
        self.model = self.prior = prior
        self.rcond = rcond
        # Whether copies cost compute here (the CPU backend's copy thread shares the cores): then the
        # per-byte cost is fitted; else (DMA engines copy: a GPU) it stays the prior's. Default: the
        # prior prices copies.
        self.fits_copy_compute = prior.copy_compute_s_per_byte > 0 if fits_copy_compute is None else fits_copy_compute
        self.min_samples = min_samples
        # compute samples, oldest first: rows (1, context tokens, new tokens, bytes copied / L) and
        # seconds per layer, kept as arrays (rebuilding them from tuples every step cost more than the fit)
        self._X = np.empty((window, 4))
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
            L = self.model.num_layers
            self._X[n] = (1.0, s.context_tokens, s.new_tokens, (s.h2d_bytes + s.d2h_bytes) / L)
            self._y[n] = compute_s / L
            self._num_compute = n + 1
        if s.h2d_bytes > 0 and s.h2d_busy_s > 0:
            self._link.append((s.h2d_bytes, s.h2d_busy_s))
        self._refit()

    def _refit(self) -> None:
        """(a, b, p), and the copies' compute per byte where copies cost compute, by least squares
        over the window, each step's stall taken off. It starts from an anchor: the prior's (a, b,
        p) scaled to the window by one factor (a machine slower or faster than the prior's at every
        term alike) and the per-byte cost in force. It moves from there only along the directions
        the window's steps tell apart: a truncated SVD of the design, each column scaled to what its
        term contributes, singular values under `rcond` of the largest dropped. A run of decode
        steps of one batch size cannot tell a from p, one request's narrow range of context cannot
        tell b from a: there the anchor's split stands instead of one taken from noise, so a step
        the window has not seen (a second request's context) is priced by the prior's shape, and
        a per-byte cost learnt before is kept until the window's copies resolve it again.
        Negative coefficients fall back to non-negative least squares on the same window.
        Truncated-SVD regularization: Hansen, "Rank-Deficient and Discrete Ill-Posed Problems"
        (SIAM, 1998), ch. 3."""
        m = self.model
        n = self._num_compute
        if n >= self.min_samples:
            fit_c = self.fits_copy_compute and bool(self._X[:n, 3].any())
            cols = 4 if fit_c else 3
            X, y = self._X[:n, :cols], self._y[:n]
            compute = y - m.copy_compute_s_per_byte * self._X[:n, 3]  # the copies at the cost in force, off
            if not fit_c:
                y = compute
            p0 = self.prior
            theta0 = np.array([p0.compute_a_s, p0.compute_b_s_per_token, p0.compute_p_s_per_token])
            at_prior = X[:, :3] @ theta0
            k = float(at_prior @ compute) / float(at_prior @ at_prior)
            anchor = np.append(theta0 * (k if k > 0 else 1.0), [m.copy_compute_s_per_byte][:cols - 3])
            # A column scaled to its term at the window's largest value under the anchor, at least a
            # tenth of the mean step: a direction's singular value is then the share of the step it
            # explains, and a term that contributes little is not learnt from noise.
            colmax = np.abs(X).max(0)
            floor = 0.1 * max(float(np.abs(y).mean()), 1e-12)
            scale = np.where(colmax > 0, np.maximum(anchor * colmax, floor) / np.where(colmax > 0, colmax, 1.0), 1.0)
            Xs = X * scale
            U, s, Vt = np.linalg.svd(Xs, full_matrices=False)
            keep = s > self.rcond * s[0]
            coef = anchor + scale * (Vt[keep].T @ ((U[:, keep].T @ (y - X @ anchor)) / s[keep]))
            if (coef < 0).any():
                coef = scale * nnls(Xs, y)[0]
            if coef[0] > 0:
                m = replace(m, compute_a_s=float(coef[0]), compute_b_s_per_token=float(coef[1]),
                            compute_p_s_per_token=float(coef[2]))
                if fit_c:
                    m = replace(m, copy_compute_s_per_byte=float(coef[3]))
        if len(self._link) >= 3:
            nbytes, secs = np.array(self._link).sum(0)
            m = replace(m, link_bytes_per_s=float(nbytes / secs))
        if m is not self.model:
            self.model = m
            self.num_fits += 1
