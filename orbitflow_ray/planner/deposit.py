"""Token-Deposit: pace a request's tokens at its SLO so early tokens cover later slow steps.

A token produced ahead of the SLO pace is banked and released when the pace reaches it; the
client sees a steady stream. Release times follow

    release_0 = emit_0                       (the first token goes out at once: TTFT is its own SLO)
    release_i = max(emit_i, release_{i-1} + pace * slo)

so the gap between released tokens is never below `pace * slo`, and a token is *late* exactly
when the bank was empty and it missed the SLO: emit_i > release_{i-1} + slo. `pace` = 1 is the
paper's pacing; the default 0.9 releases slightly faster than the SLO, which keeps TBT on time
just the same but leaves each stream 10 % of slack in its mean (TPOT): at pace 1 the mean of a
banked stream sits exactly at the SLO, so one late token would fail the request's TPOT. Tokens in the bank at time t
(emitted, not yet released) are the credit the planner counts against SLO violations
(`PlanRequest.deposit_tokens`). Disabled, release == emit and every slow token is late.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_EPS = 1e-9  # tolerance on time comparisons (timestamps are perf_counter floats)


@dataclass(slots=True)
class TokenDeposit:
    slo_s: float
    enabled: bool = True
    pace: float = 0.9  # release gap as a share of the SLO (module docstring)
    emit_times: list[float] = field(default_factory=list)
    release_times: list[float] = field(default_factory=list)
    num_late: int = 0

    def __post_init__(self) -> None:
        if not self.slo_s > 0:
            raise ValueError(f"slo_s must be positive, got {self.slo_s}")
        if not 0 < self.pace <= 1:
            raise ValueError(f"pace must be in (0, 1], got {self.pace}")

    def emit(self, t: float) -> float:
        """Record a token produced at t; returns when it is released to the client."""
        if self.emit_times and t < self.emit_times[-1]:
            raise ValueError(f"tokens must be emitted in time order ({t} < {self.emit_times[-1]})")
        if not self.release_times:
            release = t
        else:
            last = self.release_times[-1]
            if t > last + self.slo_s + _EPS:
                self.num_late += 1
            release = max(t, last + self.pace * self.slo_s) if self.enabled else t
        self.emit_times.append(t)
        self.release_times.append(release)
        return release

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
