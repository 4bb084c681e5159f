"""The plan objects that cross the serving boundaries (ingress -> worker -> planner and back).

Plain slotted dataclasses of plain values and planner views, so Ray pickles them cheaply and every
side can be tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

from orbitflow_ray.costmodel.linear import CostModel
from orbitflow_ray.outputs import TokenLogprobs
from orbitflow_ray.planner.base import CapacityView, RequestView
from orbitflow_ray.sampling_params import SamplingParams
from orbitflow_ray.serving.routing import predicted_damage


class WorkerOverloaded(RuntimeError):
    """A worker (or Serve's queue in front of the workers) is full: the client should retry later.
    Raised instead of queueing without bound, so memory stays bounded under any load."""


@dataclass(slots=True)
class GenerateRequest:
    """One request as the ingress hands it to a worker: already tokenized and validated."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # its TTFT and TPOT SLOs included (the server's defaults filled in)
    # time.time() at the ingress: the engine counts TTFT from here, so time spent in Serve's queue and
    # on the way to the worker counts against the request's TTFT SLO (as the client sees it). 0: now.
    arrival_unix: float = 0.0
    # Streamed to the client: tokens leave at their Token-Deposit release times. A non-streaming
    # response is read whole, so pacing it would only delay it.
    paced: bool = True
    # The client sent no max_tokens: params.max_tokens is the context left, and the worker lowers it
    # to what its KV tiers can hold for this request (`engine_loop.fitting_max_tokens`).
    fit_max_tokens: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(slots=True)
class StreamDelta:
    """What a worker streams back: new text and token ids since the previous delta."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None  # of token_ids, when the request asked for logprobs


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """Enough to rebuild a worker's KV policy elsewhere: registry name, layers, options."""

    name: str
    num_layers: int
    options: tuple[tuple[str, object], ...]

    @staticmethod
    def of(name: str, num_layers: int, options: dict) -> PolicySpec:
        return PolicySpec(name, num_layers, tuple(sorted(options.items())))


@dataclass(frozen=True, slots=True)
class WorkerTelemetry:
    """A worker's state at one step boundary: the planner's whole view of it. Sent periodically
    and in full, so a restarted planner rebuilds its state from the next report of each worker."""

    worker_id: str
    sent_at: float  # time.time()
    policy: PolicySpec
    running: tuple[RequestView, ...]
    num_waiting: int
    num_paused: int
    capacity: CapacityView
    cost_model: CostModel
    max_model_len: int
    kv: dict[str, int] = field(default_factory=dict)
    policy_stats: dict[str, float] = field(default_factory=dict)
    mean_step_s: float | None = None  # over the steps since the previous report
    plan_solver: str | None = None  # which solver made the plan in force ("fast", "cvxpy-highs", ...)
    prefill_load: float = 0.0  # its arrivals' prefill load (`KVPolicy.prefill_load`), for the routing probes


@dataclass(frozen=True, slots=True)
class SolveRequest:
    """Solve the placement for a worker's predicted batch `key` (the batch at the step its plan
    window ends, `budget_s` from now: the planner drops it unsolved past that)."""

    worker_id: str
    key: Hashable
    views: tuple[RequestView, ...]
    capacity: CapacityView
    pinned: frozenset[str]
    cost_model: CostModel
    policy: PolicySpec
    budget_s: float | None = None  # seconds until the step that needs the plan; None: no deadline
    # the worker's arrivals' prefill load (`KVPolicy.prefill_load`): the planner takes it off the
    # SLOs as the worker's own solves do (it sees none of the worker's arrivals)
    prefill_load: float = 0.0


@dataclass(frozen=True, slots=True)
class RoutingAdvice:
    """The planner's answer to a report: predicted SLO damage if a request of `probe_tokens[i]`
    prompt tokens joined this worker now (inf: it would wait, or others would be paused)."""

    version: int
    probe_tokens: tuple[int, ...]
    damage: tuple[float, ...]
    made_at: float  # time.time()

    def damage_at(self, prompt_tokens: int) -> float:
        """Damage of the smallest probe at least as long as the prompt (the largest if none is):
        the router's lookup, on this advice."""
        d = predicted_damage({"probe_tokens": self.probe_tokens, "damage": self.damage}, prompt_tokens)
        return 0.0 if d is None else d
