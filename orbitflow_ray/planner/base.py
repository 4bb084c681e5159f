"""The KV placement policy interface and its registry.

The scheduler consults a policy at admission (where should a new request's layers live?) and between
steps (should any running request's placement change?). Policies see plain views, never tensors, so
the real engine and the simulator run the very same objects.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, ClassVar

from orbitflow_ray.kv.blocks import Tier


@dataclass(frozen=True, slots=True)
class RequestView:
    request_id: str
    num_tokens: int  # context after this step (prompt + output so far)
    num_prompt_tokens: int
    max_tokens: int
    arrival_time: float
    placement: tuple[Tier, ...] | None  # None before admission


@dataclass(frozen=True, slots=True)
class CapacityView:
    num_layers: int
    block_size: int
    block_bytes: int
    device_total_blocks: int
    device_free_blocks: int
    host_total_blocks: int
    host_free_blocks: int


@dataclass(slots=True)
class PlacementPlan:
    """What a policy wants changed between steps: new placements per request."""

    placements: dict[str, list[Tier]]


class KVPolicy(abc.ABC):
    name: ClassVar[str]

    def __init__(self, num_layers: int, **options) -> None:
        self.num_layers = num_layers

    @abc.abstractmethod
    def place_new(self, req: RequestView, cap: CapacityView) -> list[Tier]:
        """Placement for a request being admitted (or resumed after a swap-out)."""

    def replan(self, running: list[RequestView], cap: CapacityView) -> PlacementPlan | None:
        """Placement changes between steps. Static policies change nothing."""
        return None

    @property
    def swaps_on_pressure(self) -> bool:
        """True: when the device tier is full, swap out whole requests (vLLM-style preemption)."""
        return True


_REGISTRY: dict[str, Callable[..., KVPolicy]] = {}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(name: str, num_layers: int, **options) -> KVPolicy:
    if name not in _REGISTRY:
        raise ValueError(f"unknown kv_policy {name!r}; choose one of {available_policies()}")
    return _REGISTRY[name](num_layers, **options)
