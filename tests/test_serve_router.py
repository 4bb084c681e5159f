"""The Serve request router: ranks the replicas Serve offers by the planner's advice."""

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from deployments.orbitflow_app.router import SLOFeasibilityRouter  # noqa: E402
from orbitflow_ray.sampling_params import SamplingParams  # noqa: E402
from orbitflow_ray.serving.messages import GenerateRequest  # noqa: E402


def _replica(rid: str, **stats):
    return SimpleNamespace(replica_id=rid, routing_stats=stats)


def _choose(replicas, prompt_tokens):
    router = SLOFeasibilityRouter.__new__(SLOFeasibilityRouter)  # choose_replicas needs no router state
    req = GenerateRequest("r", [1] * prompt_tokens, SamplingParams())
    pending = SimpleNamespace(args=[req], kwargs={})
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    return [[r.replica_id for r in rank] for rank in ranks]


def test_router_prefers_the_worker_a_long_prompt_hurts_least():
    probes = [256, 1024, 4096]
    busy = _replica("busy", probe_tokens=probes, damage=[0, 2, float("inf")], running=3, waiting=0)
    idle = _replica("idle", probe_tokens=probes, damage=[0, 0, 0], running=5, waiting=2)
    fresh = _replica("fresh")  # no advice yet
    assert _choose([busy, idle, fresh], 3000) == [["idle"], ["fresh"], ["busy"]]
    # A short prompt hurts nobody: less loaded first, the unadvised replica after the advised ones.
    assert _choose([busy, idle, fresh], 100) == [["busy"], ["idle"], ["fresh"]]


def test_router_without_a_request_ranks_by_load():
    a, b = _replica("a", running=4), _replica("b", running=1)
    router = SLOFeasibilityRouter.__new__(SLOFeasibilityRouter)
    ranks = asyncio.run(router.choose_replicas([a, b], None))
    assert [[r.replica_id for r in rank] for rank in ranks] == [["b"], ["a"]]
