"""The one definition of every serving metric (engine, simulator and load tests use it)."""

from orbitflow_ray.metrics.slo import (TBT_QUANTILE, RequestRecord, default_ttft_slo_s, record_from_output,
                                       record_from_request, summarize)

__all__ = ["TBT_QUANTILE", "RequestRecord", "default_ttft_slo_s", "record_from_output", "record_from_request",
           "summarize"]
