"""The KV placement problem of one plan window: inputs, the exact cost model, and the plan.

Python + numpy (two per-layer loops compiled, `linkjit.edf_stall` and `linkjit.engine_step`, the
same arithmetic); no solver here. `evaluate` is the ground truth that the ILP (`ilp.py`,
`ilp_highs.py`) optimises, that the tests brute-force, and that the simulator can replay.

Placement (distance-driven, as in the paper). Request r picks a prefetch distance d from
`distances`. Layer j (0-based) is on host iff d < L and (j + 1) % (d + 1) == 0: host layers are
d, 2d+1, 3d+2, ... and every host layer has the d device layers before it as its prefetch window,
so the first window starts at the top of the step. d = 0 puts every layer on host ("all-host":
streamed in layer by layer, as `all-offload` does), d = 1 floor(L/2) layers, d = L - 1 one layer,
d >= L none ("all on device"); we store d >= L as L. (The paper's 0-based `j % (d+1) == 0` would
put layer 0 on host with no layer to hide its transfer behind; we shift by one.)

One decode step, per layer j: compute time c = compute_a + compute_b * (batch context tokens), the
same for every layer. Host layer h of request r with distance d is a transfer of B_r = n_r * kvb
bytes (its whole KV for that layer) over the host link (BW bytes/s). Its staging slot frees when the
request's previous host layer (h - d - 1) finishes computing, so it is *released* at the end of
layer h - d - 1's compute (the top of the step for the first one) and must *land* before layer h
starts. stall_j >= 0 is the wait inserted before layer j; T = L * c + sum_j stall_j (+ the copies'
compute where they cost it: "Copy compute" below).

All-host (d = 0): layer h's transfer is released when layer h - 1 ends (the top of the step for
layer 0) and must land before layer h starts, so no compute hides it: alone on the link it adds
B_r / BW of stall to every layer. The engine does at least as well for an all-host batch:
`kv/store.py` keeps prefetch_depth + 1 >= 2 staging slots and issues layer h's copy when layer
h - 1 starts (queued behind layer h - 2's write-back, which shares its slot), so the copy also
overlaps layer h - 1's compute. The model leaves that overlap out: it is the conservative side.
(Batches that mix distances are another matter, with or without d = 0: the engine's slots serve
the union of the batch's host layers in order, so a large request's copy at a long distance can
be issued later than its window here when a small request at d = 0 or 1 shares the batch; replayed
by `sim/executor.py`, such a step took up to a quarter longer than modelled; `engine_step_time`
models the engine's order exactly, and `orbitflow` judges the solvers' plans by it.)

Link model: the transfer engine serves released transfers earliest-deadline-first in block-sized
chunks (a runner that issues copies in release order, FIFO, can stall more). For one link with
release times and deadlines that is optimal, and a set of layer start times is achievable iff
every interval from a release to a deadline has room for the transfers that lie inside it
(Horn, 1974). With time measured from the release at the end of layer a-1 to the
start of layer b, that reads, for all a <= b:

    bytes(a, b) / BW  <=  (b - a) * c  +  stall_a + ... + stall_b

where bytes(a, b) sums the transfers released at or after a with deadline at or before b. This is
the paper's per-layer budget (BW * (c + stall_j)) generalised to multi-layer windows: a transfer
may use slack from any layer of its window instead of an even 1/d share of each, so the model is
exact for an EDF link, never pessimistic. The least stalls satisfying all intervals form a
longest-path recursion (`_stall_s`), which is what `evaluate` computes. Because a class of requests
with the same d has the same windows, bytes(a, b) = sum_k count_k(a, b) * Y_k with Y_k the summed
B_r of the requests choosing distance k: the link side depends on the batch only through K numbers.
The staging slots live outside the device KV pool (as in `kv/store.py`) and are not counted.

Copy compute: where the copies run on the compute's own cores (the CPU backend: the copy thread
and the host layers' bookkeeping), each byte copied in costs `copy_compute_s_per_byte` of compute
besides its link time (the online cost model fits it; the CPU backend's prior, `cpu-2core` in
`sim/specs/gpus.yaml`, has 5.3e-10 s against 1.25e-10 s of link at 8 GB/s; 0 on a GPU, whose DMA
engines copy). `step_time` adds it for the host layers' KV copied
in: in units of c, `copy_ratio` * sum_k host_k * Y_k with host_k the host layers of class k, a
linear term in the class loads. The solvers see it as one more interval of the longest path (a
virtual last layer whose transfers are those copies, hidden behind no compute: `fastpath.LinkEval`)
or as that linear term in their objective (`ilp.py`, `ilp_highs.py`, `ilp_compact.py`); a chain
through the virtual interval bounds stall + copies (one that skips it, only the stall: still a
valid bound, a weaker one). The write-backs' copies (a block per request and host layer) are left out as
the link model leaves them out; `engine_step_time` charges every byte in and out.

Capacity: device bytes = sum_r (L - host layers of d_r) * (n_r + g_r) * kvb <= capacity, with
g_r = min(W, max_new_tokens_left) the tokens r grows by in the window (its KV at the window's end).
All-host holds no device KV, so with d = 0 in `distances` every batch fits; but each all-host
request adds its whole KV transfer to every step of the batch. A window is therefore *feasible*
only if the batch fits with every request at its largest offload short of all-host, except the
requests that fit no such offload even alone (at the shortest window), which must stream all-host
(`PlanInputs.largest_offload`). A batch over that is overloaded: INFEASIBLE, Pause-Resume's cue,
as without d = 0. Within a feasible window any placement that fits is allowed, d = 0 included, so
a request goes all-host when nothing else holds it or when that is what meets the SLOs best.

SLO and Token-Deposit. All requests share the step time T (one batch). Deposit tokens are released
at the SLO pace, so a request is late in the window only when its lag W_r * (T - slo) exceeds what
its D banked tokens cover, D * slo (W_r = g_r: a request that finishes early stops accruing lag):

    violation  <=>  T > slo * (1 + D / g_r)   (the "effective SLO").

Each late step consumes at most one banked token while T <= 2 * slo, so D tokens cover at least D
late steps. T is evaluated at the current context lengths: it is the step the plan starts with; it
grows with the contexts during the window, which is one reason the plan is re-solved when the
window ends or the batch changes.

Objective, lexicographic: fewest violations, then smallest T, then fewest bytes moved over the
link per step (`link_bytes`: the most KV read from device), then longest window W. Step times
within T_RTOL of each other tie (`tie_limit`), unless a request turns late between them. The third
key is what keeps a plan from offloading for nothing: on a link fast enough to hide every transfer
(an emulated unlimited link, or ample compute per layer) offloading costs no predicted stall, and
without it a placement that moves half the KV every step would tie with one that moves none.
Violations are a nondecreasing step function of T for a fixed W, and a longer W only shrinks the
feasible set and the effective SLOs, so the best (violations, T, bytes) is reached at the shortest
feasible W and the answer is the longest W that still reaches it. `search_windows` runs that
search over any per-window solver. Within a window the MIP weights violations above any stall
difference (`ilp.py`); the same monotonicity lets `ilp_highs.py` and `fastpath.py` minimise T
alone. Each breaks the T tie afterwards: the MIPs by a second solve of least bytes with T capped
at the tie limit (`tie_data`), the fast path exactly when it enumerates and by a greedy otherwise.
"""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from orbitflow_ray.kv.prefetch import issue_limit
from orbitflow_ray.planner.linkjit import edf_stall, engine_step

PAPER_DISTANCES = (1, 2, 3, 4, 5, 7, 9, 15, 31)  # the research code's set
ALL_HOST = 0  # the distance that puts every layer on host (module docstring)
DEFAULT_DISTANCES = (ALL_HOST,) + PAPER_DISTANCES  # L is always added
DEFAULT_WINDOWS = (32, 64, 128)  # the paper's range of plan windows, in decode steps
SLO_RTOL = 1e-9  # T within this relative margin of an effective SLO counts as on time
T_RTOL = 1e-6  # step times this close are a tie (solver tolerances are about 1e-7 relative)


@dataclass(frozen=True, slots=True)
class PlanRequest:
    request_id: str
    context_tokens: int  # tokens whose KV the next step reads (n_r)
    max_new_tokens_left: int  # caps how much the request can grow within a window
    slo_s: float  # per-token SLO (TBT / TPOT target), seconds
    deposit_tokens: int = 0  # tokens banked by Token-Deposit pacing

    def __post_init__(self) -> None:
        if self.context_tokens < 1 or self.max_new_tokens_left < 1:
            raise ValueError(f"{self.request_id}: context_tokens and max_new_tokens_left must be >= 1")
        if not self.slo_s > 0 or self.deposit_tokens < 0:
            raise ValueError(f"{self.request_id}: need slo_s > 0 and deposit_tokens >= 0")

    def growth(self, window: int) -> int:
        return min(window, self.max_new_tokens_left)

    def effective_slo_s(self, window: int) -> float:
        return self.slo_s * (1.0 + self.deposit_tokens / self.growth(window))


@dataclass(frozen=True, slots=True)
class PlanInputs:
    requests: tuple[PlanRequest, ...]
    num_layers: int
    kv_bytes_per_token_per_layer: int
    device_capacity_bytes: int  # device KV pool for this batch (staging slots excluded)
    link_bytes_per_s: float  # host -> device bandwidth
    compute_a_s: float  # per-layer compute: a + b * batch context tokens (cost model fit)
    compute_b_s_per_token: float
    distances: tuple[int, ...] | None = None  # None: DEFAULT_DISTANCES + (L,)
    windows: tuple[int, ...] = DEFAULT_WINDOWS
    # KV is held in blocks of this many tokens: a request's KV at the window's end is rounded up
    # to whole blocks, so a plan that fits here fits the block pool exactly.
    block_size: int = 1
    # Of the step's L * compute, the seconds after the last layer (LM head, sampling) that no copy
    # overlaps (`CostModel.step_tail_s`); only `engine_step_time` reads it. 0: unknown.
    step_tail_s: float = 0.0
    # Compute seconds each byte the step copies adds to it (`CostModel.copy_compute_s_per_byte`: 0
    # on a GPU, whose DMA engines copy): `step_time` charges it on the host layers' KV copied in,
    # `engine_step_time` on every byte in and out (module docstring, "Copy compute").
    copy_compute_s_per_byte: float = 0.0

    def __post_init__(self) -> None:
        L = self.num_layers
        if not self.copy_compute_s_per_byte >= 0:
            raise ValueError(f"copy_compute_s_per_byte must be >= 0, got {self.copy_compute_s_per_byte}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not self.step_tail_s >= 0:
            raise ValueError(f"step_tail_s must be >= 0, got {self.step_tail_s}")
        if L < 1 or self.kv_bytes_per_token_per_layer < 1 or self.device_capacity_bytes < 0:
            raise ValueError("need num_layers >= 1, kv_bytes_per_token_per_layer >= 1, capacity >= 0")
        if not (self.link_bytes_per_s > 0 and self.compute_a_s > 0 and self.compute_b_s_per_token >= 0):
            raise ValueError("need link_bytes_per_s > 0, compute_a_s > 0, compute_b_s_per_token >= 0")
        ids = [r.request_id for r in self.requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        if not self.windows or any(int(w) != w or w < 1 for w in self.windows):
            raise ValueError(f"windows must be integers >= 1, got {self.windows}")
        object.__setattr__(self, "requests", tuple(self.requests))
        object.__setattr__(self, "distances", distance_set(self.distances, L))
        object.__setattr__(self, "windows", tuple(sorted({int(w) for w in self.windows})))

    @property
    def copy_ratio(self) -> float:
        """Compute seconds a copied byte costs per second of link time it takes
        (`copy_compute_s_per_byte` x `link_bytes_per_s`; 0 on a GPU): the copy term of `step_time`
        in units of one layer's compute is `copy_ratio` x the host layers' loads (`window_loads`)."""
        return self.copy_compute_s_per_byte * self.link_bytes_per_s if self.copy_compute_s_per_byte else 0.0

    @property
    def compute_per_layer_s(self) -> float:
        return self.compute_a_s + self.compute_b_s_per_token * sum(r.context_tokens for r in self.requests)

    def device_layers(self) -> np.ndarray:
        """Layers kept on device, per distance class."""
        return _device_layers(self.num_layers, self.distances)

    def end_tokens(self, window: int) -> np.ndarray:
        """Tokens of KV each request holds at the window's end, in whole blocks."""
        bs = self.block_size
        ctx, left = _request_arrays(self)[:2]  # every window, bound and trial of a solve asks
        return -(-(ctx + np.minimum(left, window)) // bs) * bs

    def largest_offload(self) -> list[int]:
        """Per request, the distance with the fewest device layers short of all-host, or all-host
        for a request whose KV at the shortest window's end does not fit the device even there
        (every request at the least-device distance when all-host is not allowed)."""
        ds, R = self.distances, len(self.requests)
        partial = [d for d in ds if d != ALL_HOST]
        if not partial or ds[0] != ALL_HOST:
            return [ds[0]] * R
        L, kvb = self.num_layers, self.kv_bytes_per_token_per_layer
        fits_alone = (L - _n_host(partial[0], L)) * kvb * self.end_tokens(self.windows[0]) \
            <= self.device_capacity_bytes
        return [partial[0] if ok else ALL_HOST for ok in fits_alone]

    def min_device_bytes(self, window: int) -> int:
        """Device bytes at the window's end at `largest_offload`: over capacity, the window is
        infeasible (module docstring)."""
        return device_bytes(self, self.largest_offload(), window)


def distance_set(distances: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """The distances a plan chooses from (None: DEFAULT_DISTANCES), sorted, d >= L stored as L."""
    ds = DEFAULT_DISTANCES + (num_layers,) if distances is None else tuple(distances)
    if not ds or any(int(d) != d or d < 0 for d in ds):
        raise ValueError(f"distances must be integers >= 0, got {ds}")
    return tuple(sorted({min(int(d), num_layers) for d in ds}))


class PlanStatus(enum.Enum):
    """How a plan came to be. Solvers return the first three; the policy makes the fallbacks.
    The value is a display label only (a plan's `solver` field names its maker for metrics)."""

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"  # a plan, not proven: time limit, or an SLO inside the unproven gap
    INFEASIBLE = "infeasible"  # capacity cannot hold the batch even at the largest offload
    FALLBACK_INFEASIBLE = "fallback-infeasible"  # largest offload: nothing fits, no one may pause
    FALLBACK_ERROR = "fallback-error"  # largest offload: the solver raised

    @property
    def is_fallback(self) -> bool:
        """A largest-offload plan the policy made without a solver's answer."""
        return self in (PlanStatus.FALLBACK_INFEASIBLE, PlanStatus.FALLBACK_ERROR)


@dataclass(slots=True)
class Plan:
    """A placement for every request, valid for `window` decode steps.

    On INFEASIBLE the per-request fields are empty, `device_bytes` is what the batch needs at
    `PlanInputs.largest_offload`, and `pause_candidates` lists the requests by KV size at the
    window's end, largest first: the caller pauses from the front and re-solves."""

    status: PlanStatus
    distances: dict[str, int]  # request id -> prefetch distance (L: all layers on device)
    host_layers: dict[str, list[int]]  # request id -> its layers on host
    predicted_step_s: float  # T at the current context lengths
    violations: set[str]  # ids whose effective SLO T misses over this window
    window: int  # decode steps the plan stays in force
    solve_time_s: float  # wall time of the whole plan (every window tried), counted, never hidden
    solver: str
    device_bytes: int = 0  # device KV at the window's end
    pause_candidates: list[str] = field(default_factory=list)


def placement_for_distance(d: int, num_layers: int) -> list[bool]:
    """True = the layer lives on host. See the module docstring for the convention."""
    return [d < num_layers and (j + 1) % (d + 1) == 0 for j in range(num_layers)]


def host_layers(d: int, num_layers: int) -> list[int]:
    return list(_host_layers(d, num_layers))


@functools.lru_cache(maxsize=1024)
def _host_layers(d: int, num_layers: int) -> tuple[int, ...]:
    return tuple(j for j, on_host in enumerate(placement_for_distance(d, num_layers)) if on_host)


def _n_host(d: int, num_layers: int) -> int:
    return len(_host_layers(d, num_layers))


@functools.lru_cache(maxsize=64)
def _device_layers(num_layers: int, distances: tuple[int, ...]) -> np.ndarray:
    out = np.array([num_layers - _n_host(d, num_layers) for d in distances], dtype=np.int64)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def window_counts(num_layers: int, distances: tuple[int, ...]) -> np.ndarray:
    """counts[a, b, k]: transfers of class k released at or after a with deadline at or before b."""
    counts = np.empty((num_layers, num_layers, len(distances)))
    for k, d in enumerate(distances):
        counts[:, :, k] = _class_counts(num_layers, d)
    return counts


@functools.lru_cache(maxsize=256)
def _class_counts(num_layers: int, d: int) -> np.ndarray:
    """`window_counts` of one distance: [a, b] the transfers released at or after a landing at or
    before b (cached: plans combine the same few distances in many sets)."""
    counts = np.zeros((num_layers, num_layers))
    for h in host_layers(d, num_layers):
        counts[: h - d + 1, h:] += 1
    counts.flags.writeable = False
    return counts


@functools.lru_cache(maxsize=64)
def critical_intervals(num_layers: int, distances: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) pairs whose link constraints are not implied by shorter intervals. Splitting (a, b)
    into (a, m) and (m + 1, b) leaves out layer m's compute, so when no transfer inside crosses the
    split (released at or before m, landing after it), the two halves imply the whole. Kept: every
    split crossed (so some transfer is released exactly at a and some lands exactly at b), or a = b
    with an all-host transfer there. Returns (pairs [I, 2], counts [I, K])."""
    releases: dict[int, list[int]] = {}  # deadline -> release of every transfer landing there
    for d in distances:
        for h in host_layers(d, num_layers):
            releases.setdefault(h, []).append(h - d)
    pairs = []
    for a in range(num_layers):
        crossed, p = [False] * num_layers, a  # crossed[m]: a transfer inside runs over m | m + 1
        for b in range(a, num_layers):
            for r in releases.get(b, ()):
                if r >= a:
                    crossed[r:b] = [True] * (b - r)
            while p < b and crossed[p]:
                p += 1
            if p == b and (a < b or a in releases.get(a, ())):
                pairs.append((a, b))
    counts = window_counts(num_layers, distances)
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return arr, counts[arr[:, 0], arr[:, 1]] if len(pairs) else np.zeros((0, len(distances)))


def _stall_s(counts: np.ndarray, loads: np.ndarray, c: float, bw: float) -> float:
    """Least total stall under the EDF link model: U[b+1] = max(U[b], max_a U[a] + need(a, b)),
    U[j+1] the stall accumulated up to and including layer j (a longest path, so exact; the path
    compiled, `linkjit.edf_stall`)."""
    L = counts.shape[0]
    need = counts @ loads / bw - (np.arange(L)[None, :] - np.arange(L)[:, None]) * c
    return float(edf_stall(need))


def _normalise(inputs: PlanInputs, distances_by_request: Mapping[str, int] | Sequence[int]) -> list[int]:
    L = inputs.num_layers
    if isinstance(distances_by_request, Mapping):
        return [min(int(distances_by_request[r.request_id]), L) for r in inputs.requests]
    return [min(int(d), L) for d in distances_by_request]


def step_time(inputs: PlanInputs, distances: Sequence[int]) -> float:
    """T in seconds for a distance per request (request order); independent of the window:
    L * c + the EDF link stall + the copies' compute (`PlanInputs.copy_compute_s_per_byte` times
    the host layers' KV copied in; 0 on a GPU)."""
    L, kvb = inputs.num_layers, inputs.kv_bytes_per_token_per_layer
    classes = tuple(sorted(set(distances)))
    loads = np.zeros(len(classes))
    for r, d in zip(inputs.requests, distances):
        loads[classes.index(d)] += r.context_tokens * kvb
    c = inputs.compute_per_layer_s
    stall = _stall_s(window_counts(L, classes), loads, c, inputs.link_bytes_per_s) if classes else 0.0
    if inputs.copy_compute_s_per_byte and classes:
        stall += inputs.copy_compute_s_per_byte * float(loads @ _host_counts(L, classes))
    return L * c + stall


@functools.lru_cache(maxsize=256)
def _host_counts(num_layers: int, distances: tuple[int, ...]) -> np.ndarray:
    """Host layers of each distance [K] (float: the copy term's multipliers)."""
    out = np.array([_n_host(d, num_layers) for d in distances], dtype=float)
    out.flags.writeable = False
    return out


def copy_layers(inputs: PlanInputs) -> np.ndarray:
    """The copy term's coefficient on each class load [K] (`window_loads`' units): `copy_ratio`
    times the class's host layers; zeros on a GPU."""
    return inputs.copy_ratio * _host_counts(inputs.num_layers, inputs.distances)


def engine_step_time(inputs: PlanInputs, distances: Sequence[int], prefetch_depth: int, window: int = 0) -> float:
    """T in seconds as the engine runs the placement (`kv/store.py`, mirrored by `sim/executor.py`),
    not as the EDF link model (`step_time`) bounds it: at the start of each layer, the copies of the
    batch's host layers (the union over its requests, one copy per layer carrying every request's KV
    of it) are issued in layer order up to the `prefetch_depth + 1`-th host layer at or after it
    (`kv.prefetch.issue_limit`), onto one FIFO link; a host layer waits for its copy, computes, and
    queues the write-back of the block each request's new token touched; the step's tail
    (`PlanInputs.step_tail_s`, part of L * c) runs after the last layer, where no copy overlaps it.
    A request at a long distance then shares its copy with the short-distance requests offloading
    the same layer, and its copy is issued only when that layer comes into the union's lookahead:
    later than its own window. Equal to `step_time` when every request has one distance (up to the
    write-backs and blocks), up to a quarter above it in batches that mix them. The link is taken
    idle at the top of the step. `window` > 0: the step at that window's end instead, every request
    `growth(window)` tokens longer (its compute too). Where copies cost compute
    (`PlanInputs.copy_compute_s_per_byte` > 0: the CPU backend), the step's bytes in and out add
    that much compute after the layer loop, as `sim/executor.py` charges it. The per-layer loop is
    compiled (`linkjit.engine_step`); the bytes per layer are exact integer sums."""
    L = inputs.num_layers
    tokens, loads, backs = _step_bytes(inputs, distances, window)
    c_full = inputs.compute_a_s + inputs.compute_b_s_per_token * int(tokens.sum())
    order = np.flatnonzero(backs)
    limits = _issue_limits(tuple(order.tolist()), L, prefetch_depth)
    tail = min(inputs.step_tail_s, L * c_full)
    T = float(engine_step(loads, backs, limits, order, c_full - tail / L, inputs.link_bytes_per_s, tail))
    if inputs.copy_compute_s_per_byte:  # the copies' own compute, on the compute's critical path
        T += inputs.copy_compute_s_per_byte * int(loads.sum() + backs.sum())
    return T


def _step_bytes(inputs: PlanInputs, distances: Sequence[int], window: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens of each request [R], bytes copied in per layer [L], bytes written back per layer [L])
    of a step at these distances, as the engine copies them (whole blocks; a block per request
    written back); at `window` > 0, the step at that window's end."""
    L, kvb, bs = inputs.num_layers, inputs.kv_bytes_per_token_per_layer, inputs.block_size
    ctx, left = _request_arrays(inputs)[:2]
    tokens = ctx + np.minimum(left, window) if window else ctx
    classes, which = np.unique(np.minimum(np.asarray(distances, dtype=np.int64), L), return_inverse=True)
    member = (which[None, :] == np.arange(len(classes))[:, None]).astype(np.int64)  # [classes, R]
    on_host = _host_mask(L, tuple(classes.tolist()))  # [classes, L]
    loads = (member @ (-(-tokens // bs) * bs * kvb)) @ on_host  # bytes copied in per layer
    backs = member.sum(1) @ on_host * (bs * kvb)  # written back per layer: a block per request
    return tokens, loads, backs


@functools.lru_cache(maxsize=1024)
def _issue_limits(host: tuple[int, ...], num_layers: int, depth: int) -> np.ndarray:
    """`kv.prefetch.issue_limit` at every layer for this host-layer union [L] (cached: a plan is
    judged at its first step and at its window's end, with the same union)."""
    out = np.array([issue_limit(host, layer, depth) for layer in range(num_layers)], dtype=np.int64)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=256)
def _host_mask(num_layers: int, distances: tuple[int, ...]) -> np.ndarray:
    """[K, L] int64: 1 where distance k puts the layer on host."""
    out = np.array([placement_for_distance(d, num_layers) for d in distances], dtype=np.int64).reshape(-1, num_layers)
    out.flags.writeable = False
    return out


def late_requests(inputs: PlanInputs, T: float, window: int) -> set[str]:
    ids = _request_arrays(inputs)[4]
    return {ids[i] for i in np.flatnonzero(T > _on_time_s(inputs, window)).tolist()}


_ARRAYS: dict[int, tuple] = {}  # id(inputs) -> (inputs, `_request_arrays`), for the last few inputs


def _request_arrays(inputs: PlanInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(context tokens, tokens left, SLOs, deposits [R], ids) of the requests, kept for the last
    few inputs: a solve reads them in every window, bound, trial and judgement."""
    hit = _ARRAYS.get(id(inputs))
    if hit is not None and hit[0] is inputs:
        return hit[1]
    reqs = inputs.requests
    out = (np.array([r.context_tokens for r in reqs], dtype=np.int64),
           np.array([r.max_new_tokens_left for r in reqs], dtype=np.int64),
           np.array([r.slo_s for r in reqs], dtype=float), np.array([r.deposit_tokens for r in reqs], dtype=np.int64),
           [r.request_id for r in reqs])
    if len(_ARRAYS) >= 64:
        _ARRAYS.clear()
    _ARRAYS[id(inputs)] = (inputs, out)
    return out


def _on_time_s(inputs: PlanInputs, window: int) -> np.ndarray:
    """Per request, the largest step time on time: its effective SLO (`PlanRequest.effective_slo_s`,
    the same arithmetic elementwise) times 1 + SLO_RTOL."""
    _, left, slo, deposit, _ = _request_arrays(inputs)
    return slo * (1.0 + deposit / np.minimum(left, window)) * (1 + SLO_RTOL)


def certain_late(inputs: PlanInputs) -> set[str]:
    """Ids late under every plan of these inputs: the batch's compute alone (T with no stall, the
    least any placement reaches) is over their effective SLO at the shortest window (the largest
    it gets: a longer window only shrinks it)."""
    return late_requests(inputs, inputs.num_layers * inputs.compute_per_layer_s, inputs.windows[0])


def device_bytes(inputs: PlanInputs, distances: Sequence[int], window: int) -> int:
    L = inputs.num_layers
    table = _device_layers_by_distance(L)
    dev = np.array([table[d] if d in table else L - _n_host(d, L) for d in distances], dtype=np.int64)
    return int(dev @ inputs.end_tokens(window)) * inputs.kv_bytes_per_token_per_layer if len(dev) else 0


@functools.lru_cache(maxsize=64)
def _device_layers_by_distance(num_layers: int) -> dict[int, int]:
    """Layers on device for each distance 0..L."""
    return {d: num_layers - _n_host(d, num_layers) for d in range(num_layers + 1)}


def link_bytes(inputs: PlanInputs, distances_by_request: Mapping[str, int] | Sequence[int]) -> int:
    """Bytes a placement moves host -> device per step: every host layer's KV, once."""
    ds = _normalise(inputs, distances_by_request)
    tokens = sum(r.context_tokens * _n_host(d, inputs.num_layers) for r, d in zip(inputs.requests, ds))
    return tokens * inputs.kv_bytes_per_token_per_layer


def tie_limit(inputs: PlanInputs, window: int, T: float) -> float:
    """The largest step time that ties T: within T_RTOL of it, and no request late that is on
    time at T."""
    on_time = _on_time_s(inputs, window)
    return min([T * (1 + T_RTOL)] + on_time[on_time >= T].tolist())


def evaluate(inputs: PlanInputs, distances_by_request: Mapping[str, int] | Sequence[int],
             window: int) -> tuple[float, set[str], int]:
    """(step time T in s, ids violating their effective SLO, device KV bytes at the window's end)
    for a placement given as a distance per request (a mapping by id, or a list in request order)."""
    ds = _normalise(inputs, distances_by_request)
    T = step_time(inputs, ds)
    return T, late_requests(inputs, T, window), device_bytes(inputs, ds, window)


def fits(inputs: PlanInputs, window: int, classes: Sequence[int]) -> bool:
    """Exact (integer) capacity check of a placement given as indices into `inputs.distances`."""
    used = int(inputs.device_layers()[np.asarray(classes)] @ inputs.end_tokens(window))
    return used * inputs.kv_bytes_per_token_per_layer <= inputs.device_capacity_bytes


def violations_settled(inputs: PlanInputs, window: int, t_lower: float, t_plan: float) -> bool:
    """With the optimum known to lie in [t_lower, t_plan], the plan's violation set is optimal
    unless some effective SLO falls inside that band."""
    on_time = _on_time_s(inputs, window)
    return not ((t_lower <= on_time) & (on_time < t_plan)).any()


def window_loads(inputs: PlanInputs) -> np.ndarray:
    """Each request's KV transfer per host layer, in units of one layer's compute time [R] (the
    same in every window: `window_data`'s "load")."""
    n = np.array([r.context_tokens for r in inputs.requests], dtype=float)
    return n * inputs.kv_bytes_per_token_per_layer / (inputs.link_bytes_per_s * inputs.compute_per_layer_s)


def window_data(inputs: PlanInputs, window: int) -> dict[str, np.ndarray | float]:
    """The data of one window in units of one layer's compute time c, as the MIPs (`ilp.py`,
    `ilp_highs.py`) and the fast path use them; the formulation is in `ilp.py`'s docstring."""
    L, kvb = inputs.num_layers, inputs.kv_bytes_per_token_per_layer
    c = inputs.compute_per_layer_s
    n = np.array([r.context_tokens for r in inputs.requests], dtype=float)
    load = window_loads(inputs)
    dev = inputs.device_layers().astype(float)
    cap = np.outer(inputs.end_tokens(window) * float(kvb), dev) / max(inputs.device_capacity_bytes, 1)
    slack = np.array([r.effective_slo_s(window) for r in inputs.requests]) / c - L
    lin = copy_layers(inputs)  # the copies' compute per unit of class load (zeros on a GPU)
    u_ub = float(max(len(host_layers(d, L)) for d in inputs.distances) * (1.0 + inputs.copy_ratio) * load.sum())
    # the tie-break solve's terms (`tie_data`), neutral here: no byte cost, U and v unbounded
    return {"load": load, "cap": cap, "cap_rhs": 1.0, "slack": slack,
            "bigm": np.maximum(0.0, u_ub - slack), "weight": u_ub + 1.0, "ucoef": 1.0, "lin": lin, "ulin": lin,
            "hostload": np.zeros_like(cap), "u_cap": 2.0 * (u_ub + L) + 1.0, "v_ub": np.ones(len(n))}


def tie_data(inputs: PlanInputs, window: int, data: dict, choice: Sequence[int]) -> dict | None:
    """`window_data` for the MIPs' tie-break solve after a (violations, T)-optimal placement
    (distances in request order): least link bytes (hostload, in `load`'s units) with the stall
    (with the copies' compute) capped at the tie limit and no request late that is on time. None:
    the placement moves nothing."""
    if link_bytes(inputs, choice) == 0:
        return None
    L, c = inputs.num_layers, inputs.compute_per_layer_s
    u_cap = max(0.0, tie_limit(inputs, window, step_time(inputs, choice)) / c - L)
    return {**data, "weight": 0.0, "ucoef": 0.0, "ulin": np.zeros_like(data["lin"]), "u_cap": u_cap,
            "hostload": np.outer(data["load"], L - inputs.device_layers()),
            "v_ub": (data["slack"] < u_cap).astype(float)}


def ties_with_fewer_bytes(inputs: PlanInputs, window: int, base: Sequence[int],
                          cand: Sequence[int]) -> bool:
    """Whether placement `cand` ties `base` on (violations, T) and moves fewer bytes (the exact
    check of a tie-break solve's answer: solver tolerances do not reach the plan)."""
    T = step_time(inputs, cand)
    return (T <= tie_limit(inputs, window, step_time(inputs, base))
            and link_bytes(inputs, cand) < link_bytes(inputs, base))


def plan_better(inputs: PlanInputs, a: Plan, b: Plan) -> bool:
    """Whether plan `a` beats plan `b` of the same inputs on the full objective: a plan over an
    INFEASIBLE, then fewer violations, smaller T (step times within T_RTOL tie), fewer link bytes,
    longer window."""
    if (a.status is PlanStatus.INFEASIBLE) != (b.status is PlanStatus.INFEASIBLE):
        return b.status is PlanStatus.INFEASIBLE
    if len(a.violations) != len(b.violations):
        return len(a.violations) < len(b.violations)
    Ta, Tb = a.predicted_step_s, b.predicted_step_s
    if Ta * (1 + T_RTOL) < Tb or Tb * (1 + T_RTOL) < Ta:
        return Ta < Tb
    moved_a, moved_b = link_bytes(inputs, a.distances), link_bytes(inputs, b.distances)
    return moved_a < moved_b if moved_a != moved_b else a.window > b.window


def pause_candidates(inputs: PlanInputs, window: int) -> list[str]:
    order = np.argsort(-inputs.end_tokens(window), kind="stable")
    return [inputs.requests[i].request_id for i in order]


def make_plan(inputs: PlanInputs, choice: Sequence[int], T: float, window: int, status: PlanStatus,
              started: float, solver: str) -> Plan:
    ids, L = [r.request_id for r in inputs.requests], inputs.num_layers
    return Plan(status, {i: int(d) for i, d in zip(ids, choice)},
                {i: host_layers(d, L) for i, d in zip(ids, choice)}, T, late_requests(inputs, T, window),
                window, time.perf_counter() - started, solver, device_bytes(inputs, choice, window))


def all_device_fits(inputs: PlanInputs, window: int) -> bool:
    """Whether every layer of every request fits on device at the window's end (all-device being
    one of `inputs.distances`)."""
    L = inputs.num_layers
    return L in inputs.distances and \
        device_bytes(inputs, [L] * len(inputs.requests), window) <= inputs.device_capacity_bytes


def fit_whole_plan(inputs: PlanInputs, solver: str) -> Plan | None:
    """Every layer of every request on device, when the batch's KV fits there whole at the longest
    window: then that placement is, at every window, the optimum `search_windows` looks for, found
    with no search (no link stall, so the least T, and with it the fewest late requests; no link
    bytes), and `search_windows` picks its window. OPTIMAL, labelled `solver` (the plan that solver
    returns). None for an empty batch, or when all-device does not fit or is not allowed."""
    if not inputs.requests or not all_device_fits(inputs, inputs.windows[-1]):
        return None
    whole = [inputs.num_layers] * len(inputs.requests)
    return search_windows(inputs, lambda window: (whole, True), solver)


WindowSolver = Callable[[int], "tuple[list[int], bool]"]  # W -> (distance per request, proven optimal)


def search_windows(inputs: PlanInputs, solve_at: WindowSolver, solver: str,
                   bound_at: Callable[[int], float] | None = None) -> Plan:
    """Lexicographic (violations, T, link bytes, -W) over the candidate windows, given a per-window
    solver that returns a (violations, T, bytes)-optimal placement for a capacity-feasible window.
    `bound_at(W)`, a lower bound on T at W, lets a window that cannot tie be skipped unsolved."""
    started = time.perf_counter()
    feasible = [w for w in inputs.windows if inputs.min_device_bytes(w) <= inputs.device_capacity_bytes]
    if not feasible:
        w0 = inputs.windows[0]
        return Plan(PlanStatus.INFEASIBLE, {}, {}, float("inf"), set(), w0, time.perf_counter() - started,
                    solver, inputs.min_device_bytes(w0), pause_candidates(inputs, w0))
    if not inputs.requests:
        return make_plan(inputs, [], step_time(inputs, []), feasible[-1], PlanStatus.OPTIMAL, started, solver)
    best, proven = solve_at(feasible[0])
    T0, moved = step_time(inputs, best), link_bytes(inputs, best)
    n_late = len(late_requests(inputs, T0, feasible[0]))
    for w in reversed(feasible[1:]):  # the longest window that still reaches (n_late, T0, moved)
        if device_bytes(inputs, best, w) <= inputs.device_capacity_bytes \
                and len(late_requests(inputs, T0, w)) == n_late:
            return make_plan(inputs, best, T0, w, _status(proven), started, solver)
        if bound_at is not None and bound_at(w) > T0 * (1 + T_RTOL):
            continue
        choice, ok = solve_at(w)
        T = step_time(inputs, choice)
        if len(late_requests(inputs, T, w)) == n_late and T <= T0 * (1 + T_RTOL) \
                and link_bytes(inputs, choice) <= moved:
            return make_plan(inputs, choice, T, w, _status(proven and ok), started, solver)
    return make_plan(inputs, best, T0, feasible[0], _status(proven), started, solver)


def _status(proven: bool) -> PlanStatus:
    return PlanStatus.OPTIMAL if proven else PlanStatus.FEASIBLE
