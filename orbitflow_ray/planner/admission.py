"""Admission: may a waiting (or swapped-out, or paused) request join the running batch now?

A policy proposes where the request would go (`KVPolicy.propose`: its placement, plus any changes
to the running requests that make room, or None when no placement it allows fits); the admission
says yes or no to that proposal. Admissions are an enum plus a registry (as Vidur does); every
policy runs with any of them (`EngineConfig.admission`), or with its own when that is None
(`KVPolicy.native_admission`: `fcfs` for the baselines, `slo` for `orbitflow`).

- `fcfs`: first come, first served while it fits: the request joins whenever the policy's proposal
  fits. The scheduler offers requests in arrival order and stops at the first refused (or whose
  prompt does not fit the free blocks), so nobody overtakes. What the offloading baselines and
  vLLM do.
- `slo`: SLO-aware: it fits, and the batch with it is predicted to miss no more SLOs than the
  batch without it plus the request waiting: per-token SLOs (TPOT/TBT) by
  `KVPolicy.predicted_miss_ids` (of requests still able to meet all their SLOs: goodput counts
  only those; each SLO less the prefill load of the arrivals to come, `batch_plan_inputs`),
  joined by the running requests whose TBT SLO the request's prefill chunks would break
  (`tbt_broken`: each chunk shares a step with every decode, a late gap for each when the SLO is
  near the step, and a stream is allowed 1 % of its gaps late) and by the running requests
  still prefilling whose TTFT SLO it would break (`ttft_delayed`: its chunks share their steps, so
  their first token comes later), and the request's own TTFT when waiting would cost it
  (`ttft_at_stake`: joining now could still meet it, its prefill slowed by the prefills it shares
  steps with, waiting until the batch next changes could not; without these two terms, the CPU
  load test's trace replayed in the simulator admitted two prompts into one step, each on time
  alone, both late together). Joining may cost others TBT or TTFT; waiting costs the request its
  TTFT; each is one miss. A request late even alone (`late_alone`: its per-token SLO under the
  compute of a decode step of it alone, all on device) misses it whether it joins or waits, so it
  counts on both sides (at most once with its TTFT at stake): it waits only when joining makes
  others late (without this, a chat request's n = 8 choices under an SLO no step meets ran one at a
  time, each refused while another ran: 256 one-sequence steps for 8 x 32 tokens, not 32 steps).
  A tie is broken on everyone's late steps
  (`SloAdmission.everyone_breaks_ties`, `predicted_miss_ids(..., everyone=True)`: requests whose
  TTFT is missed counted too): the request joins unless that makes
  more of the batch late than waiting does. Those requests cost no goodput, but a batch they slow
  past the SLO runs every step slower for the queue behind it (under overload: a batch of requests
  that no longer count, offloaded and late, while every arrival's TTFT is lost waiting). With the
  tie-break off (`orbitflow-ties-join`), a tie joins. Into an empty batch a request that fits
  always joins. The queue's order bends for the same reason: a request whose TTFT SLO is lost
  (`ttft_lost`: its slack is below its own prefill) steps aside (`Admission.steps_aside`), so the
  scheduler offers the requests behind it that can still meet theirs first, in arrival order, and
  offers it again once none of those waits. Held at the head, it would make every arrival behind
  it lose its TTFT too (measured: on 8b-a100-sharegpt at 8 req/s, SLO scale 2.5, 3 seeds, goodput
  0.36 -> 1.04 req/s); it is late either way and still served, never dropped. Under sustained
  overload it waits until no request that can still meet its TTFT is queued (in the server a
  worker's bounded queue refuses arrivals once full, which bounds that wait). When it is offered
  and the batch with it fits on device whole until it finishes (`fits_device_for_life`), it skips
  the tie-break: nobody able waits for it to protect, its join adds compute only, and waiting only
  makes it later (measured on a 10x overload of two CPU workers, in README's admission paragraph:
  the backlog left when arrivals stopped joined one or two at a time, every two-request step
  predicted over the TPOT SLO). A join that would make the batch offload or pause still meets the
  tie-break (skipping it there halved goodput on the pressure family).
  A policy whose `admission_horizon` is `lifetime` (`orbitflow`'s) is judged over the batch's
  lifetime too: the same trade, on the misses predicted at the batch's KV peak
  (`KVPolicy.lifetime_misses` over `lifetime_peak`: every request grown until it finishes, those
  finished gone, nobody else joining), so a request that fits this plan window but makes the batch
  outgrow the device later (a pause, or an offload that slows every step past the SLO) waits.
  With `OrbitFlow.pause_cost` "slack" the plan at the peak may pause for the SLO too, a pause
  counted as a miss only when its wait (from when the batch first outgrows the device until its
  next finish, `outgrow_wait`) outruns the request's TPOT slack (`pause.pause_breaks_tpot`).
  The tie-break is made there too (`lifetime_misses(..., everyone=True)`).
  A `window` horizon (the baselines', `orbitflow-window-admit`) judges the next plan window only.
  What `orbitflow` does natively (its prediction is its plan's violation set); on the other
  policies the prediction is `predicted_miss_ids`' decode-step model.
"""

from __future__ import annotations

import abc
import enum
import functools
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.metrics.slo import TBT_QUANTILE
from orbitflow_ray.planner.deposit import bank_target
from orbitflow_ray.planner.problem import (ALL_HOST, PlanInputs, PlanRequest, certain_late,
                                           late_requests, placement_for_distance, step_time)

if TYPE_CHECKING:
    from orbitflow_ray.costmodel import OnlineCostModel
    from orbitflow_ray.planner.base import CapacityView, KVPolicy, PlacementPlan, RequestView


class AdmissionKind(str, enum.Enum):
    FCFS = "fcfs"
    SLO = "slo"


class Admission(abc.ABC):
    kind: ClassVar[AdmissionKind]

    def __init__(self) -> None:
        self.stats = {"admitted": 0, "refused": 0}  # decisions on proposals that fit

    def admits(self, policy: KVPolicy, req: RequestView, running: list[RequestView], cap: CapacityView,
               plan: PlacementPlan) -> bool:
        """Whether `req` joins `running` at `plan` (the policy's proposal, which fits)."""
        ok = self._admits(policy, req, running, cap, plan)
        self.stats["admitted" if ok else "refused"] += 1
        return ok

    @abc.abstractmethod
    def _admits(self, policy: KVPolicy, req: RequestView, running: list[RequestView], cap: CapacityView,
                plan: PlacementPlan) -> bool: ...

    def steps_aside(self, policy: KVPolicy, req: RequestView) -> bool:
        """May the scheduler offer the requests queued behind `req` before it? (Never, here: arrival order.)"""
        return False


_REGISTRY: dict[AdmissionKind, Callable[[], Admission]] = {}


def register_admission(cls: type[Admission]) -> type[Admission]:
    _REGISTRY[cls.kind] = cls
    return cls


@register_admission
class FcfsAdmission(Admission):
    """Join whenever the policy's proposal fits (arrival order is the scheduler's)."""

    kind = AdmissionKind.FCFS

    def _admits(self, policy, req, running, cap, plan) -> bool:
        return True


@register_admission
class SloAdmission(Admission):
    """Join only if the batch with the request is predicted to miss no more SLOs than without."""

    kind = AdmissionKind.SLO

    def __init__(self, everyone_breaks_ties: bool = True, step_aside: bool = True) -> None:
        super().__init__()
        # A tie on goodput misses is broken on the late steps of everyone, those whose TTFT is
        # missed included (`predicted_miss_ids(..., everyone=True)`); False: a tie joins.
        self.everyone_breaks_ties = everyone_breaks_ties
        # A request whose TTFT SLO is lost lets those behind it go first (`steps_aside`); False:
        # strict arrival order (`orbitflow-fifo-queue`).
        self.step_aside = step_aside

    def _admits(self, policy, req, running, cap, plan) -> bool:
        if not running:
            return True
        chunk = policy.prefill_chunk_tokens
        at_stake = ttft_at_stake(req, running, policy.num_layers, policy.cost, chunk)
        broken = (tbt_broken(req, running, policy.num_layers, policy.cost, chunk, policy.default_slo_s,
                             policy.deposit_pace)
                  | ttft_delayed(req, running, policy.num_layers, policy.cost, chunk))
        # the request's own miss if it waits: its TTFT at stake, or its per-token SLO late even alone
        alone = not at_stake and late_alone(req, cap, policy.num_layers, policy.cost, policy.default_slo_s,
                                            policy.windows)  # (one miss either way: not judged when at stake)
        own = int(at_stake or (alone and not req.ttft_missed))
        own_everyone = int(at_stake or alone)
        waiting = len(policy.predicted_miss_ids(running, None, cap)) + own
        joined = len(policy.predicted_miss_ids(running + [req], plan, cap) | broken)
        if joined > waiting:
            return False
        if joined == waiting and self._breaks_ties(policy, req, running, cap) and (
                len(policy.predicted_miss_ids(running + [req], plan, cap, everyone=True) | broken)
                > len(policy.predicted_miss_ids(running, None, cap, everyone=True)) + own_everyone):
            return False  # a tie in goodput, but it makes steps late: throughput lost for nothing
        joined = policy.lifetime_misses(running + [req], cap)
        if joined is None:
            return True
        waiting = policy.lifetime_misses(running, cap) + own
        if joined == waiting and self._breaks_ties(policy, req, running, cap):
            return (policy.lifetime_misses(running + [req], cap, everyone=True)
                    <= policy.lifetime_misses(running, cap, everyone=True) + own_everyone)
        return joined <= waiting

    def _breaks_ties(self, policy, req, running, cap) -> bool:
        """Is a tie on goodput misses broken on everyone's late steps for this join? Not for a
        request whose TTFT is lost when the batch with it fits on device for life: it is offered
        only when no able one waits (`steps_aside`), its join adds compute only, which batching
        amortizes, so the tie-break would protect nobody, and waiting only makes it later."""
        return self.everyone_breaks_ties and not (ttft_lost(req, policy.num_layers, policy.cost)
                                                  and fits_device_for_life(running + [req], cap))

    def steps_aside(self, policy, req) -> bool:
        """A queued request that can no longer meet its TTFT SLO (`ttft_lost`) lets those behind it
        that still can be offered first; it is offered again once none of them is waiting."""
        return self.step_aside and ttft_lost(req, policy.num_layers, policy.cost)


def late_alone(req: RequestView, cap: CapacityView, num_layers: int, cost: OnlineCostModel, default_slo_s: float,
               windows: tuple[int, ...]) -> bool:
    """Does `req` miss its per-token SLO (TPOT/TBT) even running alone with all its KV on device:
    the compute of a decode step of it alone (`problem.certain_late`, the least any placement
    reaches) over its SLO (its own, else `default_slo_s`; its own prefill is not its debt,
    `batch_plan_inputs`; no Token-Deposit credit)? Waiting for others to finish cannot save it."""
    inputs = batch_plan_inputs([req], cap, num_layers, cost, default_slo_s, windows)
    return req.request_id in certain_late(inputs)


def ttft_lost(req: RequestView, num_layers: int, cost: OnlineCostModel) -> bool:
    """Has `req` (no token yet) lost its TTFT SLO whatever happens: its slack is below its own
    prefill at the cost model's rate? False with a token already or no TTFT SLO."""
    if req.ttft_slack_s is None or req.num_output_tokens:
        return False
    return req.ttft_slack_s < prefill_debt_s([req], num_layers, cost)


def available_admissions() -> list[str]:
    return [k.value for k in AdmissionKind if k in _REGISTRY]


def make_admission(kind: str | AdmissionKind) -> Admission:
    """A fresh admission of this kind; ValueError names the known kinds."""
    try:
        kind = AdmissionKind(kind)
    except ValueError:
        raise ValueError(f"unknown admission {kind!r}; choose one of {available_admissions()}") from None
    return _REGISTRY[kind]()


# ---- the per-token SLO prediction both `slo` and the planner use -----------------------------------

def batch_plan_inputs(views: Sequence[RequestView], cap: CapacityView, num_layers: int, cost: OnlineCostModel,
                      default_slo_s: float, windows: tuple[int, ...], distances: tuple[int, ...] | None = None,
                      deposit: bool = False, prefill_load: float = 0.0) -> PlanInputs:
    """The placement problem of a batch: context lengths, tokens left, SLOs (a request's own, else
    `default_slo_s`), Token-Deposit credit when `deposit`, and the online cost model's coefficients.

    Prefill chunks still owed by the batch (an arrival's whole prompt included) share steps with
    the decodes: their compute is debt the other requests' tokens must absorb. TPOT is the mean
    gap over a request's output, so the debt comes off each request's SLO as (the debt of the
    others) / its tokens left (never below a tenth of the SLO: the planner then reports the miss
    instead of dividing by nothing); the late gaps of the stalled steps themselves (TBT) are what
    Token-Deposit banks for (`OrbitFlow._bank_targets`). A request's own prefill is not its debt:
    it runs before its first token, where TTFT judges it, and TPOT/TBT start at that token.

    Arrivals to come bring prefill too: at `prefill_load` rho (seconds of prefill compute per
    second, `deposit.ArrivalForecast.load`: the recent admissions' rate x their mean prefill), a
    request decoding at step T spends rho of its time in other requests' prefill chunks, so its
    mean gap is T / (1 - rho): the decode step must meet its SLO x (1 - rho). Without it, a batch
    whose decode steps were on time by the plan missed TPOT on the prefills of the requests that
    joined later (bench/README.md, "Where a simulated run's late steps come from")."""
    if not prefill_load >= 0:
        raise ValueError(f"prefill_load must be >= 0, got {prefill_load}")
    a, b = cost.model.decode_layer_coeffs(len(views))
    debt = prefill_debt_s(views, num_layers, cost)
    reqs = []
    for v in views:
        slo = v.slo_s or default_slo_s
        tokens = v.max_new_tokens_left
        others = debt - prefill_debt_s([v], num_layers, cost)
        reqs.append(PlanRequest(v.request_id, max(1, v.num_tokens), v.max_new_tokens_left,
                                max(0.1 * slo, (slo - others / max(tokens, 1)) * (1.0 - min(prefill_load, 1.0))),
                                v.deposit_tokens if deposit else 0))
    return PlanInputs(tuple(reqs), num_layers, cap.block_bytes // cap.block_size, cap.device_total_blocks * cap.block_bytes,
                      cost.model.link_bytes_per_s, a, b, distances, windows, cap.block_size,
                      cost.model.step_tail_s, cost.model.copy_compute_s_per_byte)


def fits_device_for_life(views: Sequence[RequestView], cap: CapacityView) -> bool:
    """Does the batch's KV fit the device tier whole (every layer of every request, in blocks) at
    its lifetime peak (`lifetime_peak`): can it run to the end with no offload and no pause?"""
    tokens_blocks = sum(-(-v.num_tokens // cap.block_size) for v in lifetime_peak(views))
    return tokens_blocks * cap.num_layers <= cap.device_total_blocks


def lifetime_peak(views: Sequence[RequestView]) -> list[RequestView]:
    """The batch at the decode step where its KV (the sum of its contexts) peaks if nobody joins or
    leaves early: step t adds one token to every request whose tokens left exceed t, so the sum
    rises between finishes and peaks at some request's last step (t = its tokens left - 1). Each
    view there is `t` tokens longer, its prompt computed and nothing banked (the Token-Deposit bank
    it holds now is spent long before); the requests finished by then are gone. The earliest of
    equal peaks; [] for an empty batch."""
    if not views:
        return []
    def demand(t: int) -> int:
        return sum(v.num_tokens + t for v in views if v.max_new_tokens_left > t)
    t = max(sorted({v.max_new_tokens_left - 1 for v in views}), key=demand)
    return [replace(v, num_tokens=v.num_tokens + t, num_output_tokens=v.num_output_tokens + t,
                    num_computed_tokens=None, deposit_tokens=0)
            for v in views if v.max_new_tokens_left > t]


def outgrow_wait(views: Sequence[RequestView], capacity_tokens: int) -> tuple[int, int] | None:
    """(t, wait): the first decode step t at which the batch's KV (the sum of its contexts, grown
    as `lifetime_peak` grows it: nobody joining or leaving early) exceeds `capacity_tokens`, and
    the steps from there until the batch next shrinks (its next finish): how long a request paused
    at t to make room waits. None when it never does. Units: steps."""
    start = 0
    for end in sorted({v.max_new_tokens_left for v in views}):
        active = [v for v in views if v.max_new_tokens_left >= end]  # running over steps start..end-1
        t = max(start, (capacity_tokens - sum(v.num_tokens for v in active)) // len(active) + 1)
        if t < end:
            return t, end - t
        start = end
    return None


def ttft_at_stake(req: RequestView, running: Sequence[RequestView], num_layers: int, cost: OnlineCostModel,
                  chunk_tokens: int) -> bool:
    """Would `req` lose its TTFT SLO by waiting instead of joining `running` now? True when its
    slack (`RequestView.ttft_slack_s`) still covers its prefill in the batch (joining now can meet
    the SLO) but not that plus the wait until the batch next changes: the decode steps until the
    running request with the fewest tokens left finishes, at the cost model's decode step for the
    batch (all its KV on device: the shortest such wait). Its prefill in the batch is its own
    (`prefill_debt_s`) plus the chunks of the running requests still prefilling that share its
    steps (`shared_prefill_s`). False for a request with a token already, no TTFT SLO, a slack
    that prefill already overruns (lost either way, joining or not), or an empty batch."""
    slack = req.ttft_slack_s
    if slack is None or req.num_output_tokens or not running:
        return False
    prefill = prefill_debt_s([req], num_layers, cost) + shared_prefill_s(req, running, num_layers, cost, chunk_tokens)
    wait = min(v.max_new_tokens_left for v in running) * decode_step_s(running, num_layers, cost)
    return prefill <= slack < prefill + wait


def shared_prefill_s(req: RequestView, others: Sequence[RequestView], num_layers: int, cost: OnlineCostModel,
                     chunk_tokens: int) -> float:
    """Seconds the prefill chunks of `others` add to `req`'s prefill steps: `req` needs one step a
    chunk, and each of those steps also computes the next chunk of every other request still
    prefilling (the scheduler gives each running request its next chunk, in order, as far as the
    step's token budget goes), so its first token waits for up to as many chunks of each
    (`prefill_stalls_s`). Every such chunk is counted: an upper bound when the budget defers some."""
    steps = len(prefill_stalls_s(req, num_layers, cost, chunk_tokens))
    return sum(sum(prefill_stalls_s(v, num_layers, cost, chunk_tokens)[:steps]) for v in others)


def ttft_delayed(req: RequestView, running: Sequence[RequestView], num_layers: int, cost: OnlineCostModel,
                 chunk_tokens: int) -> set[str]:
    """Ids of the running requests still prefilling whose TTFT SLO `req`'s join would break (the
    TTFT counterpart of `tbt_broken`): each of their remaining prefill steps also computes one of
    `req`'s chunks (`shared_prefill_s`), so their first token comes later by those chunks. Broken:
    the slack (`RequestView.ttft_slack_s`) covers their own prefill and the chunks already sharing
    their steps, but not with `req`'s added. Those with a token already, no TTFT SLO or a TTFT
    lost already are not."""
    out = set()
    for v in running:
        if v.num_output_tokens or v.ttft_slack_s is None:
            continue
        others = [o for o in running if o is not v]
        need = prefill_debt_s([v], num_layers, cost) + shared_prefill_s(v, others, num_layers, cost, chunk_tokens)
        if need <= v.ttft_slack_s < need + shared_prefill_s(v, [req], num_layers, cost, chunk_tokens):
            out.add(v.request_id)
    return out


def prefill_stalls_s(req: RequestView, num_layers: int, cost: OnlineCostModel, chunk_tokens: int) -> list[float]:
    """Seconds each prefill chunk of `req` adds to the decode step it shares with the running
    batch, one entry per chunk (the scheduler prefills at most `chunk_tokens` prompt tokens of a
    request a step), at the cost model's prefill rate; [] when its prompt is computed."""
    kp = num_layers * cost.model.compute_p_s_per_token
    full, rest = divmod(req.prefill_tokens_left, chunk_tokens)
    return [kp * chunk_tokens] * full + ([kp * rest] if rest else [])


def bank_wait_s(req: RequestView, running: Sequence[RequestView], num_layers: int, cost: OnlineCostModel,
                chunk_tokens: int, pace: float, default_slo_s: float, step_s: float | None = None,
                stall_margin: float = 1.0, same_step_s: float = 0.0) -> tuple[float, list[float]]:
    """Token-Deposit's join wait: how long `req` should wait before its prefill shares steps with
    `running`, so that the running streams' banks grow to cover the stalls its chunks bring
    (`prefill_stalls_s`, times `stall_margin`; the first one with `same_step_s` more: the stalls
    of prefills already joining in the step its first chunk would run in), and those stalls.
    (0, stalls) when no running request would lose its TBT SLO by them.

    The hurt requests are `tbt_hurt`'s at decode step `step_s` (the policy's predicted step, by
    default the cost model's for the batch with all KV on device). While it waits, a hurt
    request's bank grows by 1 - step / (pace x SLO) tokens a step (it releases a token per pace x
    SLO, emits one per step); a request that would finish first needs no bank (it is gone when the
    prefill starts). The wait is the longest of those, in seconds;
    infinite when a hurt request's bank cannot grow (steps at or over its pace x SLO)."""
    stalls = [stall_margin * s for s in prefill_stalls_s(req, num_layers, cost, chunk_tokens)]
    if stalls:
        stalls[0] += stall_margin * same_step_s
    if not stalls or not running:
        return 0.0, stalls
    step = step_s or decode_step_s(running, num_layers, cost)
    wait = 0
    for v, need in tbt_hurt(stalls, running, step, default_slo_s, pace):
        grow = 1 - step / (pace * (v.slo_s or default_slo_s))
        if grow <= 0:
            return math.inf, stalls  # its bank cannot grow: waiting does not help it
        wait = max(wait, min(math.ceil(need / grow), v.max_new_tokens_left))
    return wait * step, stalls


def tbt_hurt(stalls: Sequence[float], running: Sequence[RequestView], step_s: float, default_slo_s: float,
             pace: float) -> list[tuple[RequestView, int]]:
    """The running requests whose TBT SLO stalled steps would break, each with the tokens its bank
    lacks to cover them: `stalls` holds one entry per stalled step (seconds added to a decode step
    of `step_s`). A request is broken when its bank (`deposit_tokens`) is below what the stalls need
    (`deposit.bank_target`) and the late gaps they may bring (every stalled step whose step + stall
    is over its SLO) push it past the TBT SLO's allowance (the floor of 1 % of its gaps,
    `metrics.TBT_QUANTILE`). Requests whose TTFT or TBT is missed already, or with no token yet
    (TBT starts at the first), are not: they no longer count toward goodput, or not yet."""
    hurt = []
    for v in running:
        if v.num_output_tokens == 0 or v.ttft_missed:
            continue
        slo = v.slo_s or default_slo_s
        gaps = v.num_output_tokens + v.max_new_tokens_left - 1
        allowed = math.floor((1 - TBT_QUANTILE) * gaps + 1e-9)
        late = sum(1 for s in stalls if step_s + s > slo)
        need = bank_target(step_s, slo, 1, stalls, pace) - v.deposit_tokens
        if need > 0 and v.num_late_gaps <= allowed < v.num_late_gaps + late:
            hurt.append((v, need))
    return hurt


def tbt_broken(req: RequestView, running: Sequence[RequestView], num_layers: int, cost: OnlineCostModel,
               chunk_tokens: int, default_slo_s: float, pace: float = 1.0) -> set[str]:
    """Ids of the running requests whose TBT SLO `req`'s prefill chunks would break if it joined
    now (`tbt_hurt`, at the cost model's decode step for the batch with all KV on device and the
    chunks' compute, `prefill_stalls_s`): each is a goodput miss the join costs, which the `slo`
    admission weighs against waiting. A prefill chunk shares its step with every running decode,
    so when the SLO is near the step (SLO scale 1) each chunk is a late gap for every stream, and
    a stream of a few hundred tokens is allowed two or three."""
    stalls = prefill_stalls_s(req, num_layers, cost, chunk_tokens)
    if not stalls or not running:
        return set()
    step = decode_step_s(running, num_layers, cost)
    return {v.request_id for v, _ in tbt_hurt(stalls, running, step, default_slo_s, pace)}


def decode_step_s(running: Sequence[RequestView], num_layers: int, cost: OnlineCostModel) -> float:
    """The cost model's decode step for `running` with all its KV on device, seconds."""
    a, b = cost.model.decode_layer_coeffs(len(running))
    return num_layers * (a + b * sum(v.num_tokens for v in running))


def ttft_missed_ids(views: Sequence[RequestView]) -> set[str]:
    """Ids of `views` whose TTFT SLO is missed already (`RequestView.ttft_missed`): a per-token miss
    of theirs costs no goodput, so the SLO predictions do not count it."""
    return {v.request_id for v in views if v.ttft_missed}


def prefill_debt_s(views: Sequence[RequestView], num_layers: int, cost: OnlineCostModel) -> float:
    """Seconds of prefill compute the batch still owes (every prompt token not yet computed)."""
    return num_layers * cost.model.compute_p_s_per_token * sum(v.prefill_tokens_left for v in views)


def distance_like(tiers: Sequence[Tier], num_layers: int) -> int:
    """The prefetch distance whose placement (problem.py) offloads at least as many layers as
    `tiers`, the fewest such: all-device is L, all-host 0, and an evenly spread fraction (FlexGen's,
    `static.uniform_placement`) the distance with the same spacing or one tighter."""
    return _distance_for_host_layers(list(tiers).count(Tier.HOST), num_layers)


@functools.lru_cache(maxsize=4096)
def _distance_for_host_layers(n_host: int, num_layers: int) -> int:
    if n_host == 0:
        return num_layers
    return max((d for d in range(num_layers) if sum(placement_for_distance(d, num_layers)) >= n_host),
               default=ALL_HOST)


def predicted_late(inputs: PlanInputs, placements: Sequence[Sequence[Tier]], window: int) -> set[str]:
    """Requests of `inputs` (in order, each at its placement) whose per-token SLO is under the
    modelled decode step (`problem.step_time`, with the compute of the host layers' KV copied in,
    where copies cost compute; write-backs are left out, as the solvers leave them out) at this
    window's effective SLOs."""
    ds = [distance_like(p, inputs.num_layers) for p in placements]
    return late_requests(inputs, step_time(inputs, ds), window)
