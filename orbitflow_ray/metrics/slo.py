"""Latency, SLO attainment and throughput, defined once.

Definitions (the paper's, made exact):
- TTFT: first token's release minus arrival.
- TBT: gap between consecutive *released* tokens (after Token-Deposit pacing where it is on; with
  it off, release == emission). A token is on time when its TBT <= the request's SLO.
- TPOT: a request's mean TBT; TPOT attainment = share of finished requests whose TPOT meets the SLO.
- TBT attainment = share of all paced tokens (every token after a request's first) on time.
- TTFT attainment = share of requests whose TTFT meets their TTFT SLO (requests without one count
  as met).
- Throughput = (input + output tokens of finished requests) / makespan, the makespan running from
  the first arrival to the last token *produced* (pacing a stream delays its delivery, not the
  server's work); goodput = requests meeting every SLO per second of makespan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from orbitflow_ray.outputs import RequestOutput
from orbitflow_ray.request import Request

_TOL = 1e-9  # a token released exactly at the pace is on time


@dataclass(frozen=True, slots=True)
class RequestRecord:
    request_id: str
    arrival_s: float
    num_prompt_tokens: int
    release_times: tuple[float, ...]  # one per output token (== emission times without Deposit)
    tpot_slo_s: float
    ttft_slo_s: float | None = None
    finished: bool = True  # False: failed / aborted; counted, never silently dropped
    paused_s: float = 0.0
    num_pauses: int = 0
    emit_times: tuple[float, ...] = field(default=())

    @property
    def ttft_s(self) -> float | None:
        return self.release_times[0] - self.arrival_s if self.release_times else None

    @property
    def tbts(self) -> np.ndarray:
        return np.diff(np.asarray(self.release_times, dtype=float))

    @property
    def tpot_s(self) -> float | None:
        t = self.release_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    @property
    def e2e_s(self) -> float | None:
        return self.release_times[-1] - self.arrival_s if self.release_times else None

    def slo_met(self) -> dict[str, bool]:
        """Per SLO kind, whether this request met it (an unfinished request meets none)."""
        tpot, ttft = self.tpot_s, self.ttft_s
        ok = self.finished and ttft is not None
        return {"ttft": ok and (self.ttft_slo_s is None or ttft <= self.ttft_slo_s + _TOL),
                "tpot": ok and (tpot is None or tpot <= self.tpot_slo_s + _TOL)}

    def meets_all(self) -> bool:
        return all(self.slo_met().values())


def _pct(values: list[float] | np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(records: Iterable[RequestRecord], makespan_s: float | None = None,
              link_bytes: int = 0) -> dict[str, float | int | None]:
    """All metrics of a run. `makespan_s` defaults to first arrival -> last release."""
    recs = list(records)
    done = [r for r in recs if r.finished and r.release_times]
    if makespan_s is None:
        ends = [(r.emit_times or r.release_times)[-1] for r in done]
        makespan_s = (max(ends) - min(r.arrival_s for r in recs)) if ends else 0.0
    tbts = np.concatenate([r.tbts for r in done]) if done else np.zeros(0)
    slos = np.concatenate([np.full(len(r.tbts), r.tpot_slo_s) for r in done]) if done else np.zeros(0)
    tpots = [r.tpot_s for r in done if r.tpot_s is not None]
    tpot_ok = [r.tpot_s <= r.tpot_slo_s + _TOL for r in done if r.tpot_s is not None]
    ttfts = [r.ttft_s for r in done]
    out_tokens = sum(len(r.release_times) for r in done)
    in_tokens = sum(r.num_prompt_tokens for r in done)
    pauses = [r.paused_s for r in recs if r.num_pauses]
    return {
        "num_requests": len(recs),
        "num_finished": len(done),
        "num_failed": len(recs) - len(done),
        "output_tokens": out_tokens,
        "makespan_s": makespan_s,
        "tbt_attainment": float(np.mean(tbts <= slos + _TOL)) if len(tbts) else None,
        "tpot_attainment": float(np.mean(tpot_ok)) if tpot_ok else None,
        "ttft_attainment": (float(np.mean([r.ttft_slo_s is None or r.ttft_s <= r.ttft_slo_s + _TOL
                                           for r in done])) if done else None),
        "p50_tbt_s": _pct(tbts, 50), "p95_tbt_s": _pct(tbts, 95), "p99_tbt_s": _pct(tbts, 99),
        "p95_tbt_over_slo": _pct(tbts / slos, 95) if len(tbts) else None,
        "p50_tpot_s": _pct(tpots, 50), "p95_tpot_s": _pct(tpots, 95), "p99_tpot_s": _pct(tpots, 99),
        "p50_ttft_s": _pct(ttfts, 50), "p95_ttft_s": _pct(ttfts, 95), "p99_ttft_s": _pct(ttfts, 99),
        "p50_e2e_s": _pct([r.e2e_s for r in done], 50), "p95_e2e_s": _pct([r.e2e_s for r in done], 95),
        "p99_e2e_s": _pct([r.e2e_s for r in done], 99),
        "throughput_tok_s": (in_tokens + out_tokens) / makespan_s if makespan_s > 0 else None,
        "output_tok_s": out_tokens / makespan_s if makespan_s > 0 else None,
        "goodput_req_s": sum(r.meets_all() for r in done) / makespan_s if makespan_s > 0 else None,
        "num_paused_requests": len(pauses),
        "total_pauses": sum(r.num_pauses for r in recs),
        "max_pause_s": max(pauses) if pauses else 0.0,
        "mean_pause_s": float(np.mean(pauses)) if pauses else 0.0,
        "link_bytes_per_output_token": link_bytes / out_tokens if out_tokens else None,
    }


def record_from_output(out: RequestOutput) -> RequestRecord:
    """The metrics view of an engine output."""
    m = out.metrics
    return RequestRecord(out.request_id, m.arrival_time, len(out.prompt_token_ids),
                         tuple(m.release_times or m.token_times), m.slo_s or float("inf"),
                         finished=out.finished and out.finish_reason != "abort", paused_s=m.paused_s,
                         num_pauses=m.num_pauses, emit_times=tuple(m.token_times))


def record_from_request(req: Request, ttft_slo_s: float | None = None) -> RequestRecord:
    """The metrics view of a request the scheduler ran (the simulator's path)."""
    d = req.deposit
    release = tuple(d.release_times) if d is not None else tuple(req.token_times)
    return RequestRecord(req.request_id, req.arrival_time, req.num_prompt_tokens, release,
                         d.slo_s if d is not None else float("inf"), ttft_slo_s,
                         finished=req.status.finished and req.finish_reason != "abort",
                         paused_s=req.paused_s_total, num_pauses=req.num_pauses,
                         emit_times=tuple(req.token_times))
