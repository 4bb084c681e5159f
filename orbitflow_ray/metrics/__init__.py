"""The one definition of every serving metric (engine, simulator and load tests use it)."""

from orbitflow_ray.metrics.slo import RequestRecord, record_from_output, record_from_request, summarize

__all__ = ["RequestRecord", "record_from_output", "record_from_request",
           "summarize"]
