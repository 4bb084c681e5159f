"""The KV placement policy interface and its registry.

The scheduler consults a policy at admission (where should a new request's layers live?) and between
steps (should any running request's placement change?). Policies see plain views, never tensors, so
the real engine and the simulator run the very same objects.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from orbitflow_ray.costmodel import OnlineCostModel, default_prior
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner.admission import (Admission, AdmissionKind, batch_plan_inputs, make_admission,
                                             predicted_late, ttft_missed_ids)
from orbitflow_ray.planner.deposit import ArrivalForecast
from orbitflow_ray.planner.problem import DEFAULT_WINDOWS


@dataclass(frozen=True, slots=True)
class RequestView:
    request_id: str
    num_tokens: int  # context after this step (prompt + output so far)
    num_prompt_tokens: int
    max_tokens: int
    arrival_time: float
    placement: tuple[Tier, ...] | None  # None before admission
    num_output_tokens: int = 0
    slo_s: float | None = None  # per-token (TPOT/TBT) SLO; None: the policy's default
    deposit_tokens: int = 0  # tokens banked by Token-Deposit pacing, released at the SLO pace
    paused_s: float | None = None  # seconds paused so far; None when not paused
    num_computed_tokens: int | None = None  # KV already computed; None: all of num_tokens but one
    # TTFT SLO slack, seconds: arrival + TTFT SLO - the first token's time (now, before it comes);
    # negative: the TTFT SLO is missed. None: the request set no TTFT SLO.
    ttft_slack_s: float | None = None
    num_late_gaps: int = 0  # released gaps so far longer than its per-token SLO (TBT misses)
    num_waiting_behind: int = 0  # other requests waiting (the scheduler fills it for the request it offers)

    @property
    def prefill_tokens_left(self) -> int:
        """Prompt tokens still to prefill (their chunks will share steps with the decodes)."""
        done = self.num_tokens - 1 if self.num_computed_tokens is None else self.num_computed_tokens
        return max(0, self.num_tokens - 1 - done)

    @property
    def max_new_tokens_left(self) -> int:
        return max(1, self.max_tokens - self.num_output_tokens)

    @property
    def ttft_missed(self) -> bool:
        """Its TTFT SLO is already missed: it cannot count toward goodput, whatever its TPOT/TBT."""
        return self.ttft_slack_s is not None and self.ttft_slack_s < 0


@dataclass(frozen=True, slots=True)
class CapacityView:
    num_layers: int
    block_size: int
    block_bytes: int
    device_total_blocks: int
    device_free_blocks: int
    host_total_blocks: int
    host_free_blocks: int
    # Device blocks reserved for staging host-resident layers (prefetch slots, prompt buffers): not
    # counted in device_total_blocks, which is what KV placements may use.
    staging_blocks: int = 0


@dataclass(slots=True)
class PlacementPlan:
    """What a policy wants changed at a step boundary: new placements per request, and requests to
    pause (Pause-Resume: all their KV goes to host, they leave the batch, nothing is recomputed)."""

    placements: dict[str, list[Tier]]
    pause: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StepStats:
    """What the executor measured for one step, fed back to the policy (runtime refinement)."""

    step_id: int
    wall_s: float
    request_ids: tuple[str, ...]
    context_tokens: int  # KV tokens the step attended over, before its new tokens
    new_tokens: int
    num_decodes: int
    h2d_bytes: int = 0
    h2d_busy_s: float = 0.0
    now: float = 0.0


class KVPolicy(abc.ABC):
    """A KV placement policy. Options every policy takes (`policy_options` offers them all):
    `admission` (`admission.py`'s kinds; None: `native_admission`), `cost_model` (the online cost
    model the SLO predictions read; None: a CPU prior), `slo_s` (the per-token SLO of requests that
    set none) and `windows` (plan windows in decode steps); also `arrival_memory_s` (how far back the
    arrival forecast behind `prefill_load` looks, seconds; not in `policy_options`: the default)."""

    name: ClassVar[str]
    native_admission: ClassVar[AdmissionKind] = AdmissionKind.FCFS
    # Token-Deposit's release pace (a banked token per pace x SLO); 1 for policies that bank nothing
    deposit_pace: float = 1.0

    def __init__(self, num_layers: int, admission: str | None = None, cost_model: OnlineCostModel | None = None,
                 slo_s: float = 0.5, windows: tuple[int, ...] = DEFAULT_WINDOWS, prefill_chunk_tokens: int = 1024,
                 arrival_memory_s: float = 30.0, **options) -> None:
        if not slo_s > 0:
            raise ValueError(f"slo_s must be > 0, got {slo_s}")
        if not windows or any(int(w) != w or w < 1 for w in windows):
            raise ValueError(f"windows must be integers >= 1, got {windows}")
        if isinstance(prefill_chunk_tokens, bool) or not isinstance(prefill_chunk_tokens, int) or prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be an integer >= 1, got {prefill_chunk_tokens!r}")
        self.num_layers = num_layers
        # the most prompt tokens of one request in one step (the scheduler's chunked prefill)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.admission: Admission = make_admission(self.native_admission if admission is None else admission)
        self.cost = cost_model or OnlineCostModel(default_prior(num_layers, None, "cpu"))
        self.default_slo_s = slo_s
        self.windows = tuple(windows)
        # the admitted requests' arrivals and prefills over the last `arrival_memory_s` seconds: the
        # prefill load the SLO predictions take off the SLOs (`prefill_load`)
        self.arrivals = ArrivalForecast(arrival_memory_s)
        self._now = 0.0  # the clock of the last observed step (`StepStats.now`)
        # On the central planner's copy of a worker's policy: the worker's prefill load, which this
        # copy's own forecast never sees (it admits nothing); None: this policy's own
        self.remote_prefill_load: float | None = None

    @abc.abstractmethod
    def place_new(self, req: RequestView, cap: CapacityView) -> list[Tier]:
        """Placement for a request on its own, given the capacity (admission without a batch in
        view; also what the engine checks an arriving request against)."""

    def admit(self, req: RequestView, running: list[RequestView], cap: CapacityView
              ) -> PlacementPlan | None:
        """Admit (or resume) `req` into the running batch: its placement, plus any changes to the
        running requests that make room. None: not now, keep it waiting. The policy proposes
        (`propose`), its admission (`self.admission`) decides."""
        plan = self.propose(req, running, cap)
        if plan is None or not self.admission.admits(self, req, running, cap, plan):
            return None
        self.note_admitted(req)
        return plan

    def note_admitted(self, req: RequestView) -> None:
        """Count an admitted request's arrival and prefill in the arrival forecast (once per
        request, however often it is admitted again after a pause or a preemption). The clock
        moves to its arrival if no step has moved it there yet (after an idle spell)."""
        self._now = max(self._now, req.arrival_time)
        self.arrivals.note(req.request_id, req.arrival_time,
                           self.num_layers * self.cost.model.compute_p_s_per_token * req.num_prompt_tokens)

    def prefill_load(self) -> float:
        """Seconds of prefill compute per second the admissions bring (`ArrivalForecast.load`, over
        the recent ones), which the SLO predictions take off the decode step's SLO
        (`admission.batch_plan_inputs`); the worker's, on the central planner's copy of its policy
        (`remote_prefill_load`)."""
        if self.remote_prefill_load is not None:
            return self.remote_prefill_load
        return self.arrivals.load(self._now)

    def propose(self, req: RequestView, running: list[RequestView], cap: CapacityView
                ) -> PlacementPlan | None:
        """Where `req` would go if it joined now (its placement, plus any changes to the running
        requests that make room); None when no placement this policy allows fits. Here: `place_new`
        (the scheduler still checks its prompt against the free blocks)."""
        return PlacementPlan({req.request_id: self.place_new(req, cap)})

    def predicted_miss_ids(self, views: list[RequestView], plan: PlacementPlan | None, cap: CapacityView,
                           everyone: bool = False) -> set[str]:
        """Ids of `views` predicted to miss their per-token SLO (TPOT/TBT) in the next decode
        steps, each at its placement in `plan`, else its own (a request without one, at
        `place_new`'s): the online cost model's decode step at those placements (`problem.step_time`,
        a placement taken as the prefetch distance offloading at least as many layers) against each
        SLO less its share of the batch's prefill debt and the arrivals' prefill load
        (`admission.batch_plan_inputs`, `prefill_load`). Only misses
        that cost goodput count: a request whose TTFT SLO is missed already (`ttft_missed`) is not,
        unless `everyone` (the `slo` admission's tie-break: late steps for anyone)."""
        if not views:
            return set()
        changed = plan.placements if plan is not None else {}
        tiers = [changed.get(v.request_id) or v.placement or self.place_new(v, cap) for v in views]
        inputs = batch_plan_inputs(views, cap, self.num_layers, self.cost, self.default_slo_s, self.windows,
                                   prefill_load=self.prefill_load())
        return predicted_late(inputs, tiers, self.windows[0]) - (set() if everyone else ttft_missed_ids(views))

    def lifetime_misses(self, views: list[RequestView], cap: CapacityView, everyone: bool = False) -> int | None:
        """SLO misses predicted for `views` at the batch's KV peak over its lifetime
        (`admission.lifetime_peak`), for the `slo` admission's lifetime judgement; None (here):
        this policy predicts the next plan window only, and the admission judges that alone."""
        return None

    def replan(self, running: list[RequestView], cap: CapacityView) -> PlacementPlan | None:
        """Placement changes between steps. Static policies change nothing."""
        return None

    def observe(self, stats: StepStats) -> None:
        """Measured step time and traffic, after each step (runtime feedback); here its clock."""
        self._now = stats.now

    def request_finished(self, request_id: str) -> None:
        """Drop per-request state (here its mark in the arrival forecast; its arrival still counts)."""
        self.arrivals.forget(request_id)

    def deposit_target(self, request_id: str) -> int | None:
        """Tokens the request's Token-Deposit should bank now: what covers the stalls the plan
        predicts (0: none, its tokens stream as produced). None, here: no plan, so every token is
        paced at the SLO (the paper's rule, for a policy run with `token_deposit` forced on)."""
        return None

    def plan_solver(self) -> str | None:
        """Which solver produced the plan in force ("fast", "cvxpy-highs", or a fallback's
        `PlanStatus` label such as "fallback-infeasible"), for display and metrics labels only;
        None for a policy that does not plan."""
        return None

    def num_solves(self) -> int:
        """Plan solves run here so far that searched (on the decode thread and ahead of it; remote
        ones not), which the simulator charges to its clock (`SimConfig.solve_cost_s`). None here."""
        return 0

    def metrics(self) -> dict[str, float]:
        """Policy counters for the engine's stats (solve times, fallbacks, pauses); here the
        admission's decisions on proposals that fit (`admission_admitted`, `admission_refused`)."""
        return {f"admission_{k}": v for k, v in self.admission.stats.items()}

    def admission_damage(self, reqs: list[RequestView], running: list[RequestView], cap: CapacityView
                         ) -> list[float]:
        """Predicted SLO damage of admitting each of `reqs` (alone) now, for routing across
        workers: here 0 if its KV fits the free blocks at `place_new`'s placement, inf if not (it
        would wait). Planning policies override it with the misses their plan predicts."""
        return [0.0 if self._fits_free(req, cap) else float("inf") for req in reqs]

    def _fits_free(self, req: RequestView, cap: CapacityView) -> bool:
        tiers = self.place_new(req, cap)
        per_layer = -(-max(req.num_tokens, 1) // cap.block_size)
        on_device = sum(t == Tier.DEVICE for t in tiers) * per_layer
        on_host = (len(tiers) - sum(t == Tier.DEVICE for t in tiers)) * per_layer
        return on_device <= cap.device_free_blocks and on_host <= cap.host_free_blocks

    @property
    def swaps_on_pressure(self) -> bool:
        """True: when the device tier is full, swap out whole requests (vLLM-style preemption)."""
        return True


_REGISTRY: dict[str, Callable[..., KVPolicy]] = {}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    _REGISTRY[cls.name] = cls
    return cls


def available_policies(builtin_only: bool = False) -> list[str]:
    """Registered policy names; builtin_only: those this package defines (not ones a caller, such
    as a test module, registered)."""
    return sorted(n for n, cls in _REGISTRY.items()
                  if not builtin_only or getattr(cls, "__module__", "").startswith("orbitflow_ray."))


def describe_policy(name: str) -> str:
    """First line of the policy's docstring, for `orbitflow policies`."""
    doc = (_REGISTRY[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def policy_options(config) -> dict:
    """The options every policy is offered from an `EngineConfig` (each takes what it uses);
    plain values, so a central planner can rebuild the same policy from them."""
    return dict(admission=config.admission, static_offload_fraction=config.static_offload_fraction,
                pause_strategy_name=config.pause_strategy, max_pause_s=config.max_pause_s,
                slo_s=config.tpot_slo_s, windows=tuple(config.plan_windows),
                solve_ahead=config.solve_ahead, seed=config.seed, deposit_pace=config.deposit_pace,
                prefetch_depth=config.prefetch_depth,
                prefill_chunk_tokens=min(config.prefill_chunk_size, config.max_num_batched_tokens))


def policy_from_config(config, num_layers: int, cost_model) -> KVPolicy:
    """The policy an `EngineConfig` asks for: the engine and the simulator build theirs here, so
    they cannot drift."""
    return make_policy(config.kv_policy, num_layers, cost_model=cost_model, **policy_options(config))


def split_policy(spec: str, admission: str | None = None) -> tuple[str, str | None]:
    """`policy` or `policy+admission` (`no-offload+slo`) -> (policy, admission); without a suffix,
    `admission`. Raises ValueError on a `+` with no admission after it."""
    name, plus, adm = spec.partition("+")
    if plus and not adm:
        raise ValueError(f"{spec!r}: name an admission after '+' (e.g. {name}+slo)")
    return name, adm or admission


def make_policy(name: str, num_layers: int, **options) -> KVPolicy:
    if name not in _REGISTRY:
        raise ValueError(f"unknown kv_policy {name!r}; choose one of {available_policies()}")
    return _REGISTRY[name](num_layers, **options)
