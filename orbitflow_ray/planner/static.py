"""Static baselines: placements fixed at admission, never refined.

- `no-offload`: every layer on device (vLLM). Admission waits for room; pressure swaps whole requests.
- `all-offload`: every layer on host, streamed in layer by layer (DeepSpeed ZeRO-Inference, HF
  OffloadedCache).
- `static-uniform`: a fixed fraction of each request's layers on host (FlexGen's ratio), spread
  evenly through the stack so transfers spread evenly through the forward pass.
"""

from __future__ import annotations

import functools

from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner.base import CapacityView, KVPolicy, RequestView, register_policy


def uniform_placement(num_layers: int, fraction: float) -> list[Tier]:
    """Offload round(fraction * L) layers at evenly spaced positions."""
    return list(_uniform_placement(num_layers, fraction))


@functools.lru_cache(maxsize=1024)
def _uniform_placement(num_layers: int, fraction: float) -> tuple[Tier, ...]:
    n_host = round(fraction * num_layers)
    hosts = {int((i + 0.5) * num_layers / n_host) for i in range(n_host)} if n_host else set()
    return tuple(Tier.HOST if j in hosts else Tier.DEVICE for j in range(num_layers))


@register_policy
class NoOffload(KVPolicy):
    """Every layer on device (vLLM): admission waits for room, pressure swaps whole requests."""

    name = "no-offload"

    def place_new(self, req: RequestView, cap: CapacityView) -> list[Tier]:
        return [Tier.DEVICE] * self.num_layers


@register_policy
class AllOffload(KVPolicy):
    """Every layer on host, streamed in with next-layer prefetch (DeepSpeed ZeRO-Inference)."""

    name = "all-offload"

    def place_new(self, req: RequestView, cap: CapacityView) -> list[Tier]:
        return [Tier.HOST] * self.num_layers


@register_policy
class StaticUniform(KVPolicy):
    """A fixed fraction of every request's layers on host (FlexGen)."""

    name = "static-uniform"

    def __init__(self, num_layers: int, static_offload_fraction: float = 0.5, **options) -> None:
        super().__init__(num_layers, **options)
        self.placement = uniform_placement(num_layers, static_offload_fraction)

    def place_new(self, req: RequestView, cap: CapacityView) -> list[Tier]:
        return list(self.placement)
