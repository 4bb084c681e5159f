"""The plan one scheduler step hands to the executor. Only plan objects cross this boundary.

They live with the KV layer (below `model/` and `sched/`): the KV store and the model runner read
them, the scheduler writes them, and neither lower layer imports the scheduler.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field

from orbitflow_ray.kv.blocks import LayerKV, MoveOp, Tier
from orbitflow_ray.outputs import TokenLogprobs
from orbitflow_ray.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TableDelta:
    """A change to one layer's block table since the last plan that carried the request: its
    entries from `start` on are `blocks`, and the layer lives on `tier`. start == 0 rewrites the
    table (a new or recomputed request, a layer that changed tier); start > 0 appends (growth)."""

    layer: int
    tier: Tier
    start: int
    blocks: tuple[int, ...]


@dataclass(slots=True)
class ScheduledSeq:
    request_id: str
    token_ids: list[int]  # tokens whose KV this step computes
    start_pos: int  # position of token_ids[0] == tokens already in the cache
    sample: bool  # True when this step reaches the end of the sequence: sample the next token
    # The tier manager's live per-layer placement and blocks (a copy only with the scheduler's
    # snapshot_tables): valid until the next schedule(). The simulator reads it.
    table: list[LayerKV]
    sampling_params: SamplingParams
    num_output_tokens: int  # for seeded sampling: the same seed + position gives the same draw
    _: KW_ONLY  # the fields below are set by name: two of them are lists of ints, easy to swap
    # What changed in `table` since the last plan that carried this request: the engine's executor
    # keeps its own tables from these, so every plan must reach it, in order.
    table_deltas: list[TableDelta] = field(default_factory=list)
    # The request's token history, for penalties and min_tokens: shared with the request, not
    # copied (prompts are long); the sampler reads output_token_ids[:num_output_tokens] only.
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    # Set by the sampler when sampling_params.logprobs is not None: the sampled token's logprobs.
    logprobs: TokenLogprobs | None = None


@dataclass(slots=True)
class SchedulerOutput:
    step_id: int
    seqs: list[ScheduledSeq]
    # Placement changes to run before compute (swap-outs, resumes, policy refinements).
    moves: list[MoveOp] = field(default_factory=list)
    # Requests whose KV was released since the last step (executor drops per-request state,
    # before it applies this plan's table deltas: a finished request's id may be reused).
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs and not self.moves


@dataclass(frozen=True, slots=True)
class StepResult:
    """What an executor reports after running one `SchedulerOutput` (vLLM's ModelRunnerOutput):
    the scheduler's `update_from_output` takes `sampled`, the online cost model and the policy take
    the rest (`sched.feedback.feed_back`). Measured by the engine's executors (wall clock on CPU,
    CUDA events for link and stall time on CUDA), predicted by the simulator's."""

    sampled: dict[str, int]  # request id -> the token sampled for it (seqs with sample=True only)
    wall_s: float  # seconds the step took, moves included
    stall_s: float = 0.0  # seconds compute waited on transfers in this step
    h2d_bytes: int = 0  # bytes moved host -> device by jobs that completed in this step
    d2h_bytes: int = 0
    h2d_busy_s: float = 0.0  # link seconds those host -> device bytes took (the cost model's bandwidth)
    d2h_busy_s: float = 0.0
