"""Serve's request router for workers: rank replicas by the SLO damage the planner predicts for
this request (`orbitflow_ray/serving/routing.py`), read from each replica's routing stats."""

from __future__ import annotations

from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from orbitflow_ray.serving.messages import GenerateRequest
from orbitflow_ray.serving.routing import rank_workers


class SLOFeasibilityRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        prompt_tokens = None
        if pending_request is not None and pending_request.args:
            req = pending_request.args[0]
            if isinstance(req, GenerateRequest):
                prompt_tokens = req.num_prompt_tokens
        by_id = {r.replica_id: r for r in candidate_replicas}
        ranks = rank_workers({rid: r.routing_stats or {} for rid, r in by_id.items()}, prompt_tokens)
        return [[by_id[rid] for rid in rank] for rank in ranks]
