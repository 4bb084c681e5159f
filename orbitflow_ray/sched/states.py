"""The request state machine: the one table of legal transitions, and the invariants the scheduler
keeps at every step boundary.

States (`RequestStatus`) and where each request is:

| state | queue | KV |
|---|---|---|
| WAITING | `waiting` | none: new, or preempted for recompute (KV dropped, tokens kept) |
| RUNNING | `running` | every layer where its placement says, holding its computed tokens |
| PREEMPTED (swapped) | `swapped` | every layer on host; vLLM's swap preemption |
| PAUSED | `swapped` | every layer on host; Pause-Resume, chosen by the policy |
| FINISHED_STOPPED / _LENGTH / _ABORTED | none | none |

Every status change goes through `transition`, so an illegal one (say, resuming a finished request)
fails where it happens instead of corrupting a queue. `check_invariants` is what the property tests
assert after every step, under every policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.request import Request, RequestStatus

if TYPE_CHECKING:
    from orbitflow_ray.sched.scheduler import Scheduler

S = RequestStatus
_DONE = frozenset({S.FINISHED_STOPPED, S.FINISHED_LENGTH, S.FINISHED_ABORTED})
TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    S.WAITING: frozenset({S.RUNNING, S.FINISHED_ABORTED}),
    # back to WAITING: preempted for recompute; PREEMPTED: swapped out; PAUSED: Pause-Resume.
    S.RUNNING: frozenset({S.WAITING, S.PREEMPTED, S.PAUSED}) | _DONE,
    # back to WAITING: its host KV dropped for recompute when the host cannot hold its growth.
    S.PREEMPTED: frozenset({S.RUNNING, S.WAITING, S.FINISHED_ABORTED}),
    S.PAUSED: frozenset({S.RUNNING, S.WAITING, S.FINISHED_ABORTED}),
    **{done: frozenset() for done in _DONE},
}
QUEUE_OF = {S.WAITING: "waiting", S.RUNNING: "running", S.PREEMPTED: "swapped", S.PAUSED: "swapped"}


class IllegalTransition(RuntimeError):
    pass


class InvariantError(AssertionError):
    pass


def transition(req: Request, new: RequestStatus) -> None:
    """Set req's status, or raise IllegalTransition if the table above does not allow the change."""
    if new not in TRANSITIONS[req.status]:
        raise IllegalTransition(f"request {req.request_id!r}: {req.status.name} -> {new.name} is not allowed")
    req.status = new


def check_invariants(sched: Scheduler) -> None:
    """Raise InvariantError naming the first broken invariant: every live request in exactly the
    queue its state names, KV held exactly by the requests whose state has KV, in the tiers and
    amounts the state says, and the tier manager's accounting exact (`KVTierManager.check`)."""
    kv = sched.kv
    queues = {"waiting": list(sched.waiting), "running": sched.running, "swapped": sched.swapped}
    seen: dict[str, str] = {}
    for name, queue in queues.items():
        for req in queue:
            _expect(req.request_id not in seen, f"{req.request_id} is in {seen.get(req.request_id)} and {name}")
            seen[req.request_id] = name
            _expect(QUEUE_OF.get(req.status) == name, f"{req.request_id} is {req.status.name} but in {name}")
            _expect(sched.requests.get(req.request_id) is req, f"{req.request_id} in {name} is not a live request")
    _expect(set(seen) == set(sched.requests), f"live requests in no queue: {sorted(set(sched.requests) - set(seen))}")
    _expect(len(sched.running) <= sched.config.max_num_seqs, "more running requests than max_num_seqs")
    arrivals = [r.arrival_time for r in sched.swapped]
    _expect(arrivals == sorted(arrivals), "swapped requests are not in arrival order")
    with_kv = {rid for rid, r in sched.requests.items() if r.status != S.WAITING}
    _expect(set(kv.request_ids()) == with_kv,
            f"KV tables {sorted(kv.request_ids())} but requests with KV {sorted(with_kv)}")
    for rid in with_kv:
        req = sched.requests[rid]
        table = kv.table(rid)
        need = kv.blocks_for(req.num_computed_tokens)
        _expect(all(len(lk.blocks) >= need for lk in table), f"{rid} holds fewer blocks than its computed tokens")
        _expect(len({len(lk.blocks) for lk in table}) == 1, f"{rid}'s layers hold different block counts")
        if req.status in (S.PREEMPTED, S.PAUSED):
            _expect(all(lk.tier == Tier.HOST for lk in table), f"{rid} is {req.status.name} with KV on device")
        _expect((req.paused_at is not None) == (req.status == S.PAUSED), f"{rid}: paused_at vs {req.status.name}")
    for req in sched.requests.values():
        _expect(req.num_computed_tokens <= req.num_tokens, f"{req.request_id} computed past its tokens")
    kv.check()


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise InvariantError(message)
