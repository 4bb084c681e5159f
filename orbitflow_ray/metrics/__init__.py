"""The one definition of every serving metric (engine, simulator and load tests use it).

`latency`: TTFT, TBT, TPOT of one request's timestamps. `slo`: records, SLO attainment, goodput and
run summaries. `report` and `plots`: the report tables and figures the simulator and the load tests
share (import them by module: they load matplotlib). The Prometheus exporter
(`deployments/orbitflow_app/metrics.py`) observes what these compute.
"""

from orbitflow_ray.metrics.latency import tbts_s, tpot_s, ttft_s
from orbitflow_ray.metrics.slo import (TBT_QUANTILE, TBT_SAMPLES, RequestRecord, default_ttft_slo_s,
                                       record_from_output, record_from_request, summarize, tbt_over_slo)

__all__ = ["TBT_QUANTILE", "TBT_SAMPLES", "RequestRecord", "default_ttft_slo_s", "record_from_output",
           "record_from_request", "summarize", "tbt_over_slo", "tbts_s", "tpot_s", "ttft_s"]
