"""A request's life in the engine: its tokens, progress, status and timestamps.

Only data lives here; the scheduler moves requests between statuses and the tier manager owns their
KV blocks.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orbitflow_ray.outputs import TokenLogprobs
from orbitflow_ray.sampling_params import SamplingParams

if TYPE_CHECKING:
    from orbitflow_ray.detokenizer import IncrementalDetokenizer
    from orbitflow_ray.planner.deposit import TokenDeposit


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # swapped out whole (KV kept on host), waits to resume
    PAUSED = "paused"  # Pause-Resume: the policy deferred it (KV kept on host), waits to resume
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)  # when sampling_params.logprobs is set
    # Tokens whose KV is already in the cache. Prefill advances it by chunks, decode by one.
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    token_times: list[float] = field(default_factory=list)
    output_text: str = ""
    detokenizer: IncrementalDetokenizer | None = None  # set by an engine that detokenizes
    stop_reason: str | int | None = None
    # Token-Deposit pacing of this request's stream (release times, late tokens); set by the scheduler.
    deposit: TokenDeposit | None = None
    paused_at: float | None = None  # when the current pause began
    paused_s_total: float = 0.0  # all pauses so far, for the starvation bound and reports
    num_pauses: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating a long prompt every step."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
