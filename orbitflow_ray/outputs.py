"""What the engine hands back: per request, the text, the token ids and per-token timestamps."""

from __future__ import annotations

from dataclasses import dataclass, field

from orbitflow_ray.metrics.latency import tbts_s, tpot_s, ttft_s


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    # One perf_counter timestamp per output token, when the step that produced it finished.
    token_times: list[float] = field(default_factory=list)
    # When each token is released to the client (Token-Deposit pacing; == token_times when off).
    release_times: list[float] = field(default_factory=list)
    slo_s: float | None = None
    num_late_tokens: int = 0  # tokens after the first that missed the SLO pace with an empty deposit
    paused_s: float = 0.0  # total time paused by Pause-Resume
    num_pauses: int = 0
    ttft_slo_s: float | None = None  # the request's TTFT SLO (SamplingParams.ttft_slo_s), if it set one

    # Engine-side latencies on emission times (`orbitflow_ray.metrics.latency`); what the client
    # sees (release times) is `metrics.record_from_output(out)`.
    @property
    def ttft(self) -> float | None:
        return ttft_s(self.arrival_time, self.token_times)

    @property
    def tbts(self) -> list[float]:
        return tbts_s(self.token_times).tolist()

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's definition)."""
        return tpot_s(self.token_times)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One output token's log-probability and the likeliest tokens at its position, as natural logs
    of the model's raw distribution (softmax of its logits before logit_bias, penalties, temperature
    and top-k/top-p: vLLM's default). `top` is sorted by logprob, highest first, and has
    `SamplingParams.logprobs` entries (it may or may not contain `token_id`)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    # Tokens new since the previous output of this request (for streaming).
    new_token_ids: list[int] = field(default_factory=list)
    # One entry per token of token_ids when SamplingParams.logprobs is set; None otherwise.
    logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One executed step, as calibration and benchmarks see it."""

    step_id: int
    context_tokens: int  # cached tokens attended over, before the step
    new_tokens: int
    num_seqs: int
    num_sampled: int
    wall_s: float  # scheduling + execution
    h2d_bytes: int = 0  # copies completed during the step (a write-back may land in the next one)
    d2h_bytes: int = 0
