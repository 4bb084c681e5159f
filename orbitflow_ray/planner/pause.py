"""Pause-Resume: which in-flight request to pause when no placement fits, and Pause-for-SLO.

`largest` (the paper's choice) frees the most device KV per pause, so the fewest requests wait;
`shortest` and `random` exist for the ablation. Strategies see request views and return one id.
"""

from __future__ import annotations

import logging
import random
from typing import Callable

from orbitflow_ray.planner.admission import ttft_missed_ids
from orbitflow_ray.planner.base import RequestView
from orbitflow_ray.planner.problem import Plan, PlanInputs, PlanStatus, certain_late

log = logging.getLogger(__name__)

PauseStrategy = Callable[[list[RequestView], random.Random], str]


def _largest(cands: list[RequestView], rng: random.Random) -> str:
    # Ties go to the newest arrival: it has waited least so far.
    return max(cands, key=lambda v: (v.num_tokens, v.arrival_time)).request_id


def _shortest(cands: list[RequestView], rng: random.Random) -> str:
    return min(cands, key=lambda v: (v.num_tokens, -v.arrival_time)).request_id


def _random(cands: list[RequestView], rng: random.Random) -> str:
    return rng.choice(cands).request_id


PAUSE_STRATEGIES: dict[str, PauseStrategy] = {"largest": _largest, "shortest": _shortest, "random": _random}


def pause_strategy(name: str) -> PauseStrategy:
    if name not in PAUSE_STRATEGIES:
        raise ValueError(f"unknown pause_strategy {name!r}; choose one of {sorted(PAUSE_STRATEGIES)}")
    return PAUSE_STRATEGIES[name]


# Trial solves one Pause-for-SLO search may run, each a full fast-path solve on the decode thread: a
# count, so the bound holds whatever the machine's load.
SLO_PAUSE_MAX_TRIALS = 8
SLO_PAUSE_LINEAR = 4  # pauses tried one by one before the search may double


def pause_breaks_tpot(tokens_left: int, wait_steps: int, step_s: float, slo_s: float) -> bool:
    """Would pausing a request with `tokens_left` tokens to go for `wait_steps` decode steps (each
    up to `slo_s` seconds: the batch it leaves runs on time) cost it its TPOT SLO? True when that
    wait is more than its tokens left can absorb at `step_s` a step:
    wait_steps x slo_s > (slo_s - step_s) x tokens_left. TPOT is the mean gap over its output and
    TBT allows 1 % of the gaps late, so a pause that fits in that slack is one late gap, not a
    miss. Conservative: the slack its past tokens banked is not counted. Units: steps, seconds."""
    return wait_steps * slo_s > (slo_s - step_s) * tokens_left


class SloPauseSearch:
    """Pause-for-SLO: Pause-Resume under a slow link, a search around the placement solver.

    When a feasible plan misses the SLOs of requests that can still meet all theirs
    (`admission.ttft_missed_ids`), try pausing the first k requests of one order (`order`: those
    whose TTFT is missed first, then the pause strategy's, one by one), re-solving each time, and
    keep the fewest pauses that leave the fewest misses in all, counting a pause as its request's
    miss when that request can still meet all its SLOs and (given `costs`) the pause costs it one
    (`pause_breaks_tpot`: a pause within its TPOT slack is one late gap, which TBT allows): the
    trade the admission makes. No pause when none pays.

    Bounded by counts, never a clock (it runs on the decode thread): at most `max_trials` trial
    solves per search. k grows by one while the budget left covers every k left (then the search is
    the exhaustive one's) or k < SLO_PAUSE_LINEAR; past that it doubles, and a doubling that pays is
    bisected back towards the last k that did not, on the budget left (a run of pauses that each
    leave the misses as they were: 32 requests that all miss until a dozen are paused). Exact stops
    cost no solve: the search ends once the pauses' own misses reach the best total (no larger k can
    beat it), and a k whose certain misses (`problem.certain_late`: compute alone is over their SLO)
    reach it is not solved. Every trial is warm-started from the plan searched from, so a skipped k
    changes no other trial's plan, and the solver is left seeded with the plan chosen.

    `counters` (the policy's, shared) gets `slo_pauses` (pauses chosen), `slo_pause_trials`
    (solves), `slo_pause_trials_max` (most in one search), `slo_pause_skipped` and
    `slo_pause_capped`. ValueError for a `max_trials` that is not an integer >= 0.
    """

    def __init__(self, pick_victim: PauseStrategy, rng: random.Random, counters: dict[str, int],
                 max_trials: int = SLO_PAUSE_MAX_TRIALS) -> None:
        if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 0:
            raise ValueError(f"slo_pause_max_trials must be an integer >= 0, got {max_trials!r}")
        self.pick_victim, self.rng, self.max_trials = pick_victim, rng, max_trials
        self.counters = counters
        for key in ("slo_pauses", "slo_pause_trials", "slo_pause_trials_max", "slo_pause_skipped",
                    "slo_pause_capped"):
            counters.setdefault(key, 0)

    def search(self, plan: Plan, active: list[RequestView], pinned: frozenset[str],
               inputs_for: Callable[[list[RequestView]], PlanInputs], solve: Callable[[PlanInputs], Plan],
               seed: Callable[[dict[str, int]], None],
               costs: Callable[[RequestView], bool] | None = None) -> tuple[Plan, list[str]]:
        """The plan to run and the ids to pause (in pause order; [] when no pause pays) for the
        batch `active` planned as `plan`; `pinned` are never paused. `inputs_for(views)` is the
        policy's problem of a batch, `solve` its solve of one (as it judges plans), `seed` warm-starts
        that solver with distances by request id. `costs(view)`: whether pausing that request costs
        it an SLO (None: every pause of a request still able to meet all its SLOs does)."""
        missed = ttft_missed_ids(active)
        if not plan.violations - missed:
            return plan, []
        free = set() if costs is None else {v.request_id for v in active if not costs(v)}
        order = self.order(active, pinned, missed | free)
        cost = [0]  # cost[k]: misses the first k pauses count themselves
        for rid in order:
            cost.append(cost[-1] + (rid not in missed and rid not in free))
        best = [len(plan.violations - missed), plan, 0]  # misses in all, plan, pauses
        budget, trials, failed = self.max_trials, 0, False

        def tries(k: int) -> bool:
            """Solve with the first k paused; True when that beats the best so far."""
            nonlocal trials, failed
            gone = set(order[:k])
            inputs = inputs_for([v for v in active if v.request_id not in gone])
            if cost[k] + len(certain_late(inputs) - missed) >= best[0]:
                self.counters["slo_pause_skipped"] += 1
                return False
            trials += 1
            seed(plan.distances)
            try:
                trial = solve(inputs)
            except Exception:
                log.exception("placement solve failed while pausing for the SLO; keeping the best plan")
                failed = True
                return False
            if trial.status == PlanStatus.INFEASIBLE or len(trial.violations - missed) + cost[k] >= best[0]:
                return False
            best[:] = [len(trial.violations - missed) + cost[k], trial, k]
            return True

        k, capped = 0, False
        while k < len(order) and not failed:
            if cost[k + 1] >= best[0]:  # misses >= pauses' own, from here on: none beats best
                break
            if trials >= budget:
                capped = True
                break
            step = budget - trials >= len(order) - k or k < SLO_PAUSE_LINEAR
            lo, k = k, k + 1 if step else min(2 * k, len(order))
            if tries(k) and k - lo > 1:  # bisect (lo, k) on what is left of the budget
                hi = k
                while hi - lo > 1 and not failed:
                    if trials >= budget:
                        capped = True
                        break
                    mid = (lo + hi) // 2
                    if cost[mid] >= best[0] or tries(mid):
                        hi = mid
                    else:
                        lo = mid
        self.counters["slo_pause_capped"] += capped
        self.counters["slo_pause_trials"] += trials
        self.counters["slo_pause_trials_max"] = max(self.counters["slo_pause_trials_max"], trials)
        if trials:
            seed(best[1].distances)
        extra = order[:best[2]]
        self.counters["slo_pauses"] += len(extra)
        return best[1], extra

    def order(self, active: list[RequestView], pinned: frozenset[str], missed: set[str]) -> list[str]:
        """The order the search pauses in: unpinned requests in `missed` (TTFT missed, or a pause
        that costs them no SLO) first, then the others, each group by the pause strategy; one
        request always stays."""
        rest, order = list(active), []
        while len(rest) > 1:
            victims = [v for v in rest if v.request_id not in pinned]
            if not victims:
                break
            victim = self.pick_victim([v for v in victims if v.request_id in missed] or victims, self.rng)
            rest = [v for v in rest if v.request_id != victim]
            order.append(victim)
        return order
