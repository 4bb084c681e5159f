"""KV placement policies (registry). Importing this package registers the built-in policies."""

from orbitflow_ray.planner import baselines, orbitflow, static  # noqa: F401  (registers policies)
from orbitflow_ray.planner.base import (CapacityView, KVPolicy, PlacementPlan, RequestView, StepStats,
                                        available_policies, describe_policy, make_policy,
                                        policy_from_config, policy_options, register_policy,
                                        split_policy)

__all__ = ["CapacityView", "KVPolicy", "PlacementPlan", "RequestView", "StepStats", "available_policies",
           "describe_policy", "make_policy", "policy_from_config", "policy_options",
           "register_policy", "split_policy"]
