"""Token-Deposit: bank a request's early tokens to cover the slow steps its plan predicts.

The paper (OrbitFlow, Token-Deposit) paces every stream at the SLO: a token produced ahead of the
pace is banked and released when the pace reaches it, so a later slow step (a stall) is hidden by
the tokens in the bank. Pacing a stream that no stall will hit only slows it down, so here the
bank has a *target*: `target_tokens`, the tokens that cover the stalls the plan predicts
(`bank_target`: its slow steps over its window, the prefill the batch owes, the prefills of
arrivals forecast from the recent ones over the longest plan window, `ArrivalForecast`, and the
prefill of an arrival that waits to join until the banks cover it, `OrbitFlow.bank_wait`). The
banks cover the late *gaps* those prefills make (TBT); the plan covers what they add to the mean
gap (TPOT) by planning each SLO less the arrivals' prefill load (`admission.batch_plan_inputs`).
The scheduler sets it from `KVPolicy.deposit_target` before every token; on an idle server it is 0.

Release rule, with ps = pace * slo and the previous token's release r_{i-1} (final or banked):

    token i is emitted at e_i and provisionally released at max(e_i, r_{i-1} + ps)  (paced);
    then, while the bank (tokens emitted, release still ahead of e_i) holds more than the
    target, its oldest token is released at e_i and the rest are re-paced behind it.

Invariants (tests/test_deposit.py checks each):
- release_i >= e_i, and releases never decrease; the first token goes out at once (TTFT is its
  own SLO).
- target 0: release == emit, the stream runs at the engine's rate. target None: the bank has no
  limit, every token is paced (the paper's rule, for a policy without a plan).
- While the bank is below its target, a new token leaves at least ps after the previous one;
  right after an emit the bank holds at most `target_tokens` tokens. A banked token's release is
  provisional: a later emit (the bank outgrew a lowered target) or `flush` may move it earlier,
  never later. `release_times` below the latest emit are final.
- A finished request's bank goes out at its last emit (`flush`: nothing is left to cover), so its
  first and last releases are its first and last emissions: its TPOT (the mean gap) is exactly
  what it would be without the deposit, for the same emissions.
- A token is *late* exactly when the bank was empty and it missed the SLO: e_i > r_{i-1} + slo
  with r_{i-1} <= e_i. Since r_{i-1} >= e_{i-1}, a late token is late without the deposit too,
  so the deposit never adds late tokens.
- `pace` = 1 is the paper's pacing; the default 0.9 fills the bank releasing slightly faster than
  the SLO, which keeps every gap on time just the same and leaves slack for a late one.

Tokens in the bank at time t (emitted, not yet released) are the credit the planner counts
against SLO violations (`PlanRequest.deposit_tokens`). Disabled, release == emit and every slow
token is late.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

_EPS = 1e-9  # tolerance on time comparisons (timestamps are perf_counter floats)


def bank_target(step_s: float, slo_s: float, tokens: int, stalls_s: Sequence[float] = (),
                pace: float = 1.0) -> int:
    """Tokens a request's bank must hold so that its next `tokens` tokens, each taking `step_s`
    seconds, with some steps taking `stalls_s` more (one entry per stalled step: prefill chunks),
    stay on time.

    Two needs, the larger wins, 0 when neither exists:
    - the stalled steps (TBT): while one runs, the bank releases a token per pace x slo, and the
      token after it is late unless step + stall <= banked x pace x slo + slo; each stall draws
      its own share (the bank is not counted as refilled between them: the conservative side);
    - a slow window (TPOT): tokens x (step - slo) of lag, one banked token per SLO of it, as the
      planner counts credit (`PlanRequest.effective_slo_s`).
    Raises ValueError on a non-positive step, SLO or pace, or negative tokens or stall."""
    if not (step_s > 0 and slo_s > 0 and 0 < pace <= 1) or tokens < 0 or any(s < 0 for s in stalls_s):
        raise ValueError(f"need step_s > 0, slo_s > 0, 0 < pace <= 1, tokens >= 0 and stalls_s >= 0, got "
                         f"{step_s=}, {slo_s=}, {pace=}, {tokens=}, {stalls_s=}")
    if tokens == 0:
        return 0
    stall = sum(max(0.0, step_s + s - slo_s) for s in stalls_s if s > 0) / (pace * slo_s)
    lag = tokens * (step_s - slo_s) / slo_s
    return max(0, math.ceil(max(stall, lag) - 1e-6))


@dataclass(slots=True)
class ArrivalForecast:
    """The prefill arrivals will bring, forecast from the recent ones.

    An arrival's prompt is prefilled in the steps that decode the running batch: a stall the
    batch's streams must cover, which the plan's inputs cannot show before it arrives. The
    forecast: arrivals keep coming at the rate of those seen in the last `memory_s` seconds
    ((n - 1) arrivals over the span from the oldest to now: one arrival alone is no rate), each
    stalling one step by the largest of their prefills (`stalls`), and taking the rate x their
    mean prefill of every second's compute (`load`; over a span of at least `memory_s` / 2, so
    a burst of two arrivals does not read as a sustained rate). So an idle server, or one serving a
    lone request, forecasts none. Thread-safe: the engine thread notes arrivals while the solve-
    ahead thread reads the load."""

    memory_s: float = 30.0
    _arrivals: list = field(default_factory=list, init=False, repr=False)  # (arrival s, prefill s), sorted
    _seen: set = field(default_factory=set, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.memory_s > 0:
            raise ValueError(f"memory_s must be positive, got {self.memory_s}")

    def note(self, request_id: str, arrival_s: float, prefill_s: float) -> None:
        """An admitted request (noted once, however often it is seen again), in arrival order
        whatever the admission order."""
        with self._lock:
            if request_id not in self._seen:
                self._seen.add(request_id)
                bisect.insort(self._arrivals, (arrival_s, prefill_s))

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._seen.discard(request_id)

    def _recent(self, now: float, min_span_s: float = 0.0) -> tuple[float, list[tuple[float, float]]]:
        """(arrivals per second, the arrivals) over the memory, the span taken at least
        `min_span_s`; rate 0 with fewer than two arrivals in it."""
        with self._lock:
            cut = bisect.bisect_left(self._arrivals, (now - self.memory_s,))
            del self._arrivals[:cut]
            recent = list(self._arrivals)
        if len(recent) < 2 or now <= recent[0][0]:
            return 0.0, recent
        return (len(recent) - 1) / max(now - recent[0][0], min_span_s), recent

    def stalls(self, now: float, horizon_s: float) -> list[float]:
        """Prefill stall seconds expected within the next `horizon_s`, one per expected arrival
        (the expected count, rounded to nearest)."""
        rate, recent = self._recent(now)
        if not rate:
            return []
        return [max(p for _, p in recent)] * math.floor(rate * max(horizon_s, 0.0) + 0.5)

    def load(self, now: float) -> float:
        """The prefill load arrivals bring: seconds of prefill compute per second (the arrival rate
        over at least half the memory x their mean prefill), 0 with fewer than two arrivals."""
        rate, recent = self._recent(now, self.memory_s / 2)
        return rate * sum(p for _, p in recent) / len(recent) if rate else 0.0


@dataclass(slots=True)
class TokenDeposit:
    slo_s: float  # the request's TPOT/TBT SLO, seconds
    enabled: bool = True
    pace: float = 0.9  # release gap as a share of the SLO while banking (module docstring)
    target_tokens: int | None = None  # bank size to keep (None: no limit, the paper's rule)
    emit_times: list[float] = field(default_factory=list)
    release_times: list[float] = field(default_factory=list)
    num_late: int = 0
    _first_banked: int = field(default=0, init=False, repr=False)  # no token before it is banked

    def __post_init__(self) -> None:
        if not self.slo_s > 0:
            raise ValueError(f"slo_s must be positive, got {self.slo_s}")
        if not 0 < self.pace <= 1:
            raise ValueError(f"pace must be in (0, 1], got {self.pace}")
        if self.target_tokens is not None and self.target_tokens < 0:
            raise ValueError(f"target_tokens must be >= 0 or None, got {self.target_tokens}")

    def emit(self, t: float) -> float:
        """Record a token produced at t; returns its release time (provisional while banked)."""
        if self.emit_times and t < self.emit_times[-1]:
            raise ValueError(f"tokens must be emitted in time order ({t} < {self.emit_times[-1]})")
        if self.target_tokens is not None and self.target_tokens < 0:
            raise ValueError(f"target_tokens must be >= 0 or None, got {self.target_tokens}")
        if not self.release_times:
            release = t
        else:
            last = self.release_times[-1]
            if t > last + self.slo_s + _EPS:
                self.num_late += 1
            release = max(t, last + self.pace * self.slo_s) if self.enabled else t
        self.emit_times.append(t)
        self.release_times.append(release)
        if self.target_tokens is not None:
            self._trim(t, self.target_tokens)
        return self.release_times[-1]

    def flush(self, t: float) -> None:
        """Release the whole bank at t (the request finished: no stall is left to cover).
        Raises ValueError if t precedes the last emit."""
        if self.emit_times and t < self.emit_times[-1]:
            raise ValueError(f"flush at {t} precedes the last emit ({self.emit_times[-1]})")
        self._trim(t, 0)

    def _trim(self, t: float, keep: int) -> None:
        """Release the oldest banked tokens at t until at most `keep` remain; re-pace the rest."""
        rel, ps = self.release_times, self.pace * self.slo_s
        i = self._first_banked
        while i < len(rel) and rel[i] <= t + _EPS:
            i += 1
        excess = len(rel) - i - keep
        if excess <= 0:
            self._first_banked = i
            return
        rel[i:i + excess] = [t] * excess
        for j in range(i + excess, len(rel)):
            rel[j] = min(rel[j], max(self.emit_times[j], rel[j - 1] + ps))
        self._first_banked = i + excess

    def banked(self, now: float) -> int:
        """Tokens emitted but not yet released at `now`."""
        n = 0
        for r in reversed(self.release_times):
            if r <= now + _EPS:
                break
            n += 1
        return n

    @property
    def num_tokens(self) -> int:
        return len(self.emit_times)

    @property
    def num_paced(self) -> int:
        """Tokens after the first, the ones the SLO applies to."""
        return max(0, len(self.emit_times) - 1)
