"""Step-time prediction shared by the planner and the simulator, fitted online from measurements."""

from orbitflow_ray.costmodel.linear import CostModel, OnlineCostModel, StepSample, default_prior

__all__ = ["CostModel", "OnlineCostModel", "StepSample", "default_prior"]
