"""Synthetic and recorded request traces for the simulator.

    from orbitflow_ray.sim.workload import WorkloadConfig, generate, apply_slo_scale, scale_rate
    trace = generate(WorkloadConfig(arrival="lognormal", rate_per_s=0.5, cv=1.0, length="longbench"))
    sweep = {f: apply_slo_scale(scale_rate(trace, f), base_step_s, 1.5) for f in (1, 2, 3, 4, 5)}

Arrival processes and length distributions are each an enum plus a registry (as Vidur does).
Traces are JSONL, one request per line: see `load_trace` / `save_trace`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Callable

import numpy as np


def _check_positive(allow_none: bool = False, **values) -> None:
    for name, value in values.items():
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be positive{' when set' if allow_none else ''}, got {value!r}")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    request_id: str
    arrival_s: float
    input_tokens: int
    output_tokens: int
    tpot_slo_s: float | None = None
    ttft_slo_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("input_tokens", "output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be finite and >= 0, got {self.arrival_s!r}")
        _check_positive(True, tpot_slo_s=self.tpot_slo_s, ttft_slo_s=self.ttft_slo_s)


def _parse(enum_cls: type[Enum], value, what: str):
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; choose one of "
                         f"{[k.value for k in enum_cls]}") from None


# --- arrival processes: inter-arrival gaps with mean 1/rate and a given coefficient of variation

class ArrivalKind(str, Enum):
    POISSON = "poisson"
    GAMMA = "gamma"
    LOGNORMAL = "lognormal"


GapSampler = Callable[[float, float, int, np.random.Generator], np.ndarray]  # (rate, cv, n, rng)
_ARRIVALS: dict[ArrivalKind, GapSampler] = {
    ArrivalKind.POISSON: lambda rate, cv, n, rng: rng.exponential(1.0 / rate, n),
    # shape k = 1/CV^2 gives CV = 1/sqrt(k); scale 1/(rate k) keeps the mean at 1/rate.
    ArrivalKind.GAMMA: lambda rate, cv, n, rng: rng.gamma(1.0 / cv**2, cv**2 / rate, n),
    # sigma^2 = ln(1 + CV^2) sets the CV; mu = ln(1/rate) - sigma^2/2 keeps the mean at 1/rate.
    ArrivalKind.LOGNORMAL: lambda rate, cv, n, rng: rng.lognormal(
        -math.log(rate) - math.log1p(cv**2) / 2, math.sqrt(math.log1p(cv**2)), n),
}


def _check_arrival(kind: ArrivalKind, rate_per_s: float, cv: float) -> None:
    _check_positive(rate_per_s=rate_per_s, cv=cv)
    if kind is ArrivalKind.POISSON and cv != 1.0:
        raise ValueError(f"poisson arrivals have CV 1 (got cv={cv}); use gamma or lognormal")


def arrival_times(kind: ArrivalKind | str, rate_per_s: float, n: int, cv: float = 1.0,
                  rng: np.random.Generator | int | None = None) -> np.ndarray:
    """n nondecreasing arrival times in seconds; the first request arrives at 0 (no idle lead-in).

    rng: a Generator, or a seed for one (None: fresh OS entropy).
    """
    kind = _parse(ArrivalKind, kind, "arrival process")
    _check_arrival(kind, rate_per_s, cv)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    gaps = _ARRIVALS[kind](rate_per_s, cv, max(n - 1, 0), np.random.default_rng(rng))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:n]


def _arrivals_until(kind: ArrivalKind, rate_per_s: float, cv: float, duration_s: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Arrival times in [0, duration_s), drawn in chunks until one passes duration_s."""
    chunk = max(64, int(rate_per_s * duration_s * 1.2))
    times, last = [np.zeros(1)], 0.0
    while last < duration_s:
        step = last + np.cumsum(_ARRIVALS[kind](rate_per_s, cv, chunk, rng))
        times.append(step)
        last = float(step[-1])
    out = np.concatenate(times)
    return out[out < duration_s]


# --- length distributions: (input, output) token counts per request

class LengthKind(str, Enum):
    SHAREGPT = "sharegpt"
    LONGBENCH = "longbench"
    FIXED = "fixed"
    UNIFORM = "uniform"
    PRESSURE = "pressure"


@dataclass(frozen=True, slots=True)
class LengthParams:
    """A distribution's resolved parameters. input/output_tokens: fixed's value, sharegpt's mean."""
    input_tokens: int | None = None
    output_tokens: int | None = None
    min_input_tokens: int | None = None
    max_input_tokens: int | None = None
    min_output_tokens: int | None = None
    max_output_tokens: int | None = None


LengthSampler = Callable[[LengthParams, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, slots=True)
class _LengthDist:
    defaults: LengthParams  # a None default on a used field means "the caller must set it"
    uses: tuple[str, ...]
    sample: LengthSampler


_BOUNDS = ("min_input_tokens", "max_input_tokens", "min_output_tokens", "max_output_tokens")
# ShareGPT stand-in: lognormals matched to summary statistics commonly reported for ShareGPT
# conversations (mean input ~1000 tokens with a long right tail, mean output ~250), not samples
# of the data set; the spreads (sigma) are our choice. Use load_trace for a real trace.
_SHAREGPT_SIGMA_IN, _SHAREGPT_SIGMA_OUT = 1.0, 0.8


def _clipped_lognormal(mean: int, sigma: float, lo: int, hi: int, n: int, rng) -> np.ndarray:
    x = rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n)  # unclipped mean == `mean`
    return np.clip(np.rint(x), lo, hi).astype(np.int64)


def _sharegpt(p: LengthParams, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    inp = _clipped_lognormal(p.input_tokens, _SHAREGPT_SIGMA_IN, p.min_input_tokens,
                             p.max_input_tokens, n, rng)
    out = _clipped_lognormal(p.output_tokens, _SHAREGPT_SIGMA_OUT, p.min_output_tokens,
                             p.max_output_tokens, n, rng)
    return inp, out


def _longbench(p: LengthParams, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    # Log-uniform inputs: each doubling (4K-8K, ..., 64K-128K) is equally likely, so one trace
    # mixes short and very long contexts instead of piling up near the cap.
    lo, hi = p.min_input_tokens, p.max_input_tokens
    inp = np.minimum(np.floor(np.exp(rng.uniform(math.log(lo), math.log(hi + 1), n))), hi)
    out = rng.integers(p.min_output_tokens, p.max_output_tokens, n, endpoint=True)
    return inp.astype(np.int64), out


def _fixed(p: LengthParams, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, p.input_tokens, np.int64), np.full(n, p.output_tokens, np.int64)


def _uniform(p: LengthParams, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    return (rng.integers(p.min_input_tokens, p.max_input_tokens, n, endpoint=True),
            rng.integers(p.min_output_tokens, p.max_output_tokens, n, endpoint=True))


_LENGTHS: dict[LengthKind, _LengthDist] = {
    LengthKind.SHAREGPT: _LengthDist(LengthParams(1000, 250, 4, 16 << 10, 1, 2 << 10),
                                     ("input_tokens", "output_tokens") + _BOUNDS, _sharegpt),
    LengthKind.LONGBENCH: _LengthDist(LengthParams(None, None, 4 << 10, 128 << 10, 64, 512),
                                      _BOUNDS, _longbench),
    LengthKind.FIXED: _LengthDist(LengthParams(), ("input_tokens", "output_tokens"), _fixed),
    LengthKind.UNIFORM: _LengthDist(LengthParams(None, None, 1, None, 1, None), _BOUNDS, _uniform),
    # KV pressure (the results grid's Pause-Resume family): inputs 1K-4K and outputs 1K-4K tokens,
    # uniform, so every output outlasts the longest plan window (128 decode steps) many times and a
    # batch admitted when it fitted outgrows the device KV mid-run; pair it with bursty arrivals
    # (CV > 1) and a device KV budget well below the batch's peak.
    LengthKind.PRESSURE: _LengthDist(LengthParams(None, None, 256, 1 << 10, 2 << 10, 4 << 10),
                                     _BOUNDS, _uniform),
}


def resolve_lengths(kind: LengthKind | str, **given: int | None) -> LengthParams:
    """Merge the caller's parameters over the distribution's defaults, and check them.

    A lowered max below a defaulted min pulls the min down with it (longbench capped at 2K).
    """
    kind = _parse(LengthKind, kind, "length distribution")
    dist = _LENGTHS[kind]
    values = {}
    for f in fields(LengthParams):
        value = given.get(f.name)
        if value is not None and f.name not in dist.uses:
            raise ValueError(f"length {kind.value!r} does not use {f.name} (it uses {list(dist.uses)})")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{f.name} must be an integer >= 1, got {value!r}")
        if value is None and f.name in dist.uses and getattr(dist.defaults, f.name) is None:
            raise ValueError(f"length {kind.value!r} needs {f.name}")
        values[f.name] = value if value is not None else getattr(dist.defaults, f.name)
    for side in ("input", "output"):
        lo, hi = f"min_{side}_tokens", f"max_{side}_tokens"
        if values[lo] is not None and values[hi] is not None and values[lo] > values[hi]:
            if given.get(lo) is not None:
                raise ValueError(f"{lo}={values[lo]} exceeds {hi}={values[hi]}")
            values[lo] = values[hi]
    return LengthParams(**values)


# --- one validated config, one generator


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(slots=True)
class WorkloadConfig:
    arrival: ArrivalKind | str = _help(
        "Arrival process: poisson, gamma or lognormal. lognormal with CV 1, as in the paper.",
        default=ArrivalKind.LOGNORMAL)
    rate_per_s: float = _help("Mean arrival rate in requests per second. Sweep it on one trace with "
                              "scale_rate (the paper runs 1-5x a base rate).", default=1.0)
    cv: float = _help("Coefficient of variation of the inter-arrival gaps (1: as bursty as "
                      "Poisson; poisson accepts only 1).", default=1.0)
    num_requests: int | None = _help(
        "Trace length in requests. None with no duration_s: 50, the paper's trace size.", default=None)
    duration_s: float | None = _help(
        "Instead of num_requests: keep the arrivals before this time.", default=None)
    length: LengthKind | str = _help("Length distribution: sharegpt, longbench, fixed, uniform or pressure.",
                                     default=LengthKind.SHAREGPT)
    input_tokens: int | None = _help("fixed: every input's length; sharegpt: the mean (1000).",
                                     default=None)
    output_tokens: int | None = _help("fixed: every output's length; sharegpt: the mean (250).",
                                      default=None)
    min_input_tokens: int | None = _help("Input floor. None: the distribution's (sharegpt 4, "
                                         "longbench 4K, uniform 1).", default=None)
    max_input_tokens: int | None = _help(
        "Input cap: fit the model's context (sharegpt 16K, longbench 128K; raise it for a 1M-context "
        "model, lower it for an 8K one; uniform needs it).", default=None)
    min_output_tokens: int | None = _help("Output floor. None: the distribution's (longbench 64).",
                                          default=None)
    max_output_tokens: int | None = _help("Output cap. None: the distribution's (sharegpt 2K, "
                                          "longbench 512; uniform needs it).", default=None)
    seed: int = _help("Seed: the same seed gives the same trace.", default=0)
    tpot_slo_s: float | None = _help("Per-token SLO for every request, in seconds. None: set it "
                                     "later with apply_slo_scale.", default=None)
    ttft_slo_s: float | None = _help(
        "Time-to-first-token SLO for every request, in seconds. None: the judge's default (the "
        "simulator's: slo_scale x (idle prefill + (prefill chunks + 1) x the no-offload step)).",
        default=None)
    lengths: LengthParams = field(init=False, repr=False, metadata={"help": "Resolved parameters."})

    def __post_init__(self) -> None:
        self.arrival = _parse(ArrivalKind, self.arrival, "arrival process")
        self.length = _parse(LengthKind, self.length, "length distribution")
        _check_arrival(self.arrival, self.rate_per_s, self.cv)
        if self.num_requests is not None and self.duration_s is not None:
            raise ValueError("set num_requests or duration_s, not both")
        if self.num_requests is None and self.duration_s is None:
            self.num_requests = 50
        if self.num_requests is not None and self.num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {self.num_requests}")
        _check_positive(True, duration_s=self.duration_s, tpot_slo_s=self.tpot_slo_s,
                        ttft_slo_s=self.ttft_slo_s)
        self.lengths = resolve_lengths(self.length, **{f.name: getattr(self, f.name)
                                                       for f in fields(LengthParams)})

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls) if f.init}

    def to_dict(self) -> dict:
        """JSON-ready, for writing next to a run's output."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {k: v.value if isinstance(v, Enum) else v for k, v in d.items()}


def generate(cfg: WorkloadConfig) -> list[TraceRequest]:
    # Separate streams: changing the length distribution leaves the arrival times unchanged.
    arrival_rng, length_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(2))
    if cfg.duration_s is not None:
        times = _arrivals_until(cfg.arrival, cfg.rate_per_s, cfg.cv, cfg.duration_s, arrival_rng)
    else:
        times = arrival_times(cfg.arrival, cfg.rate_per_s, cfg.num_requests, cfg.cv, arrival_rng)
    inp, out = _LENGTHS[cfg.length].sample(cfg.lengths, len(times), length_rng)
    return [TraceRequest(f"req-{i:04d}", float(t), int(a), int(b), cfg.tpot_slo_s, cfg.ttft_slo_s)
            for i, (t, a, b) in enumerate(zip(times, inp, out))]


# --- trace I/O and transforms

_TRACE_KEYS = tuple(f.name for f in fields(TraceRequest))


def _request_from_json(obj, index: int) -> TraceRequest:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_TRACE_KEYS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {list(_TRACE_KEYS)}")
    for key in ("arrival_s", "input_tokens", "output_tokens"):
        if key not in obj:
            raise ValueError(f"missing {key!r}")
    kw = dict(obj)
    for key in ("input_tokens", "output_tokens"):
        value = kw[key]
        if isinstance(value, float) and value.is_integer():
            kw[key] = int(value)  # some writers emit 512.0
    if isinstance(kw["arrival_s"], bool) or not isinstance(kw["arrival_s"], (int, float)):
        raise ValueError(f"arrival_s must be a number, got {kw['arrival_s']!r}")
    kw["arrival_s"] = float(kw["arrival_s"])
    kw["request_id"] = str(kw.get("request_id", f"req-{index:04d}"))
    return TraceRequest(**kw)


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSONL trace (blank lines skipped), sorted by arrival (stable). Ids default to req-NNNN."""
    trace, seen = [], set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                req = _request_from_json(json.loads(line), len(trace))
                if req.request_id in seen:
                    raise ValueError(f"duplicate request_id {req.request_id!r}")
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            seen.add(req.request_id)
            trace.append(req)
    return sorted(trace, key=lambda r: r.arrival_s)


def save_trace(trace: list[TraceRequest], path: str | Path) -> None:
    """One JSON object per line; unset SLOs are left out. Floats round-trip exactly."""
    with open(path, "w", encoding="utf-8") as fh:
        for req in trace:
            fh.write(json.dumps({k: v for k, v in asdict(req).items() if v is not None}) + "\n")


def scale_rate(trace: list[TraceRequest], factor: float) -> list[TraceRequest]:
    """The same requests arriving `factor` times as fast (arrival times divided by factor)."""
    _check_positive(factor=factor)
    return [replace(r, arrival_s=r.arrival_s / factor) for r in trace]


def apply_slo_scale(trace: list[TraceRequest], base_step_s: float, scale: float) -> list[TraceRequest]:
    """Give every request without one a TPOT SLO of scale x base_step_s.

    base_step_s: the no-offload decode step time with the device KV full (the caller measures or
    models it); the paper's scales are 1, 1.5 and 2.5.
    """
    _check_positive(base_step_s=base_step_s, scale=scale)
    slo = scale * base_step_s
    return [r if r.tpot_slo_s is not None else replace(r, tpot_slo_s=slo) for r in trace]
