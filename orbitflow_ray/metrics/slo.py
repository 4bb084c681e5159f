"""Latency, SLO attainment and throughput, defined once.

Definitions (the paper's, made exact):
- TTFT: first token's release minus arrival.
- TBT: gap between consecutive *released* tokens (after Token-Deposit pacing where it is on; with
  it off, release == emission). A token is on time when its TBT <= the request's TPOT/TBT SLO.
- TPOT: a request's mean TBT; TPOT attainment = share of finished requests whose TPOT meets the SLO.
- TBT attainment = share of all paced tokens (every token after a request's first) on time.
- A request meets its TBT SLO when its P99 gap (nearest rank) is within the SLO: at most
  floor(1 % of its gaps) are late, so a request of fewer than 100 gaps must have every gap on time
  (Sarathi-Serve and DistServe judge the P99 gap; nearest rank keeps it an observed gap).
  TBT request attainment = share of finished requests meeting it.
- TTFT attainment = share of finished requests whose TTFT meets their TTFT SLO (a request without
  one counts as met; the simulator gives every request one, see `default_ttft_slo_s`).
- Goodput = requests meeting all three SLOs (TTFT, TPOT, TBT as above) per second of makespan;
  all-SLO attainment = the share of *all* requests (failed ones count as misses) meeting all three.
- Throughput = (input + output tokens of finished requests) / makespan, the makespan running from
  the first arrival to the last token *produced* (pacing a stream delays its delivery, not the
  server's work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import numpy as np

from orbitflow_ray.metrics.latency import tbts_s, tpot_s, ttft_s

if TYPE_CHECKING:  # outputs.py imports metrics.latency: no runtime import back
    from orbitflow_ray.outputs import RequestOutput
    from orbitflow_ray.request import Request

_TOL = 1e-9  # a token released exactly at the pace is on time
TBT_QUANTILE = 0.99  # the per-request TBT SLO judges this quantile of the request's gaps
TBT_SAMPLES = 2000  # TBT / SLO samples kept per run for CDF plots (`tbt_over_slo`)


def default_ttft_slo_s(prefill_s: float, prefill_steps: int, decode_step_s: float, scale: float) -> float:
    """The default TTFT SLO of a request: scale x (prefill_s + (prefill_steps + 1) x decode_step_s).

    prefill_s: the request's own prefill on an idle device (all its KV on device), in prefill_steps
    chunked steps; decode_step_s: the no-offload decode step at full device KV, the step the TPOT SLO
    is scaled from. The bracket is the TTFT the request would see if admitted on arrival into a full
    no-offload batch: its prefill, plus a queueing allowance of one decode step for the step running
    when it arrives and one per prefill chunk (each chunk shares its step with the batch's decodes).
    Waiting for a batch slot or behind other prompts is what the SLO then judges. The rule follows
    Splitwise (Patel et al., ISCA 2024: TTFT SLOs as slowdowns of the request's latency on an idle
    machine) with DistServe's SLO scale (Zhong et al., OSDI 2024), the `scale` the TPOT SLO uses, so
    `--slo-scale` tightens or loosens both. Units: seconds. Raises ValueError on non-positive inputs.
    """
    if not (prefill_s >= 0 and decode_step_s > 0 and scale > 0) or prefill_steps < 1:
        raise ValueError(f"need prefill_s >= 0, prefill_steps >= 1, decode_step_s > 0 and scale > 0, got "
                         f"{prefill_s=}, {prefill_steps=}, {decode_step_s=}, {scale=}")
    return scale * (prefill_s + (prefill_steps + 1) * decode_step_s)


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
        return ttft_s(self.arrival_s, self.release_times)

    @property
    def tbts(self) -> np.ndarray:
        return tbts_s(self.release_times)

    @property
    def tpot_s(self) -> float | None:
        return tpot_s(self.release_times)

    @property
    def e2e_s(self) -> float | None:
        return self.release_times[-1] - self.arrival_s if self.release_times else None

    @property
    def num_late_tbts(self) -> int:
        """Gaps longer than the TPOT/TBT SLO."""
        return int(np.sum(self.tbts > self.tpot_slo_s + _TOL))

    def slo_met(self) -> dict[str, bool]:
        """Per SLO kind (ttft, tpot, tbt), whether this request met it (an unfinished one meets none).

        tbt: the P99 gap (nearest rank) within the SLO, i.e. at most floor(1 % of the gaps) late.
        """
        tpot, ttft = self.tpot_s, self.ttft_s
        ok = self.finished and ttft is not None
        allowed_late = math.floor((1 - TBT_QUANTILE) * len(self.tbts) + _TOL)
        return {"ttft": ok and (self.ttft_slo_s is None or ttft <= self.ttft_slo_s + _TOL),
                "tpot": ok and (tpot is None or tpot <= self.tpot_slo_s + _TOL),
                "tbt": ok and self.num_late_tbts <= allowed_late}

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
    met = [r.slo_met() for r in done]
    meets_all = sum(all(m.values()) for m in met)
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
        "ttft_attainment": float(np.mean([m["ttft"] for m in met])) if met else None,
        "tbt_request_attainment": float(np.mean([m["tbt"] for m in met])) if met else None,
        "all_slo_attainment": meets_all / len(recs) if recs else None,
        "p50_tbt_s": _pct(tbts, 50), "p95_tbt_s": _pct(tbts, 95), "p99_tbt_s": _pct(tbts, 99),
        "p95_tbt_over_slo": _pct(tbts / slos, 95) if len(tbts) else None,
        "p50_tpot_s": _pct(tpots, 50), "p95_tpot_s": _pct(tpots, 95), "p99_tpot_s": _pct(tpots, 99),
        "p50_ttft_s": _pct(ttfts, 50), "p95_ttft_s": _pct(ttfts, 95), "p99_ttft_s": _pct(ttfts, 99),
        "p50_e2e_s": _pct([r.e2e_s for r in done], 50), "p95_e2e_s": _pct([r.e2e_s for r in done], 95),
        "p99_e2e_s": _pct([r.e2e_s for r in done], 99),
        "throughput_tok_s": (in_tokens + out_tokens) / makespan_s if makespan_s > 0 else None,
        "output_tok_s": out_tokens / makespan_s if makespan_s > 0 else None,
        "goodput_req_s": meets_all / makespan_s if makespan_s > 0 else None,
        "num_paused_requests": len(pauses),
        "total_pauses": sum(r.num_pauses for r in recs),
        "max_pause_s": max(pauses) if pauses else 0.0,
        "mean_pause_s": float(np.mean(pauses)) if pauses else 0.0,
        "link_bytes_per_output_token": link_bytes / out_tokens if out_tokens else None,
    }


def tbt_over_slo(records: Iterable[RequestRecord], k: int = TBT_SAMPLES, seed: int = 0) -> list[float]:
    """Every paced token's TBT / SLO over the finished records, sorted, subsampled to at most k
    (deterministically under `seed`), for CDF plots."""
    vals = [r.tbts / r.tpot_slo_s for r in records if r.finished and len(r.release_times) > 1]
    if not vals:
        return []
    arr = np.concatenate(vals)
    if len(arr) > k:
        arr = np.random.default_rng(seed).choice(arr, k, replace=False)
    return np.sort(arr).round(6).tolist()


def record_from_output(out: RequestOutput) -> RequestRecord:
    """The metrics view of an engine output (its SLOs as the request set them; TPOT default inf)."""
    m = out.metrics
    return RequestRecord(out.request_id, m.arrival_time, len(out.prompt_token_ids),
                         tuple(m.release_times or m.token_times), m.slo_s or float("inf"), m.ttft_slo_s,
                         finished=out.finished and out.finish_reason != "abort", paused_s=m.paused_s,
                         num_pauses=m.num_pauses, emit_times=tuple(m.token_times))


def record_from_request(req: Request) -> RequestRecord:
    """The metrics view of a request the scheduler ran (the simulator's path); its TTFT SLO is
    `req.sampling_params.ttft_slo_s`."""
    d = req.deposit
    release = tuple(d.release_times) if d is not None else tuple(req.token_times)
    return RequestRecord(req.request_id, req.arrival_time, req.num_prompt_tokens, release,
                         d.slo_s if d is not None else float("inf"), req.sampling_params.ttft_slo_s,
                         finished=req.status.finished and req.finish_reason != "abort",
                         paused_s=req.paused_s_total, num_pauses=req.num_pauses,
                         emit_times=tuple(req.token_times))
