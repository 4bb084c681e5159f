"""The simulator's prediction of a load test: the same trace (arrivals, lengths, SLOs) replayed
through `orbitflow_ray.sim.simulator` with the app's engine config and a GPU spec (`cpu-2core`:
this machine, calibrated).

The client's concurrency cap is not modelled: every request reaches the simulated server at its
trace arrival.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orbitflow_ray.metrics import RequestRecord, summarize
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.sim.simulator import SimConfig, Simulator
from orbitflow_ray.sim.workload import TraceRequest

def sim_config(args: AppArgs, gpu: str) -> SimConfig:
    """The simulator's view of the app's (first) worker engine: its EngineConfig, at TP 1 (a
    calibrated CPU spec is the whole machine, which the shards of a TP worker share)."""
    e = dataclasses.replace(args.engine_config(), tensor_parallel_size=1)
    return SimConfig(engine=e, gpu=gpu, tpot_slo_s=e.tpot_slo_s, ttft_slo_s=args.default_ttft_slo_s)


@dataclass(slots=True)
class Prediction:
    records: list[RequestRecord]  # the measured requests only (warm-up left out, as in the measurement)
    metrics: dict
    sim_wall_s: float


def predict(trace: list[TraceRequest], args: AppArgs, gpu: str = "cpu-2core",
            warmup_ids: frozenset[str] = frozenset()) -> Prediction:
    sim = Simulator(sim_config(args, gpu))  # the engine's emulated host link copied as is (`SimConfig`)
    result = sim.run(trace)
    records = [r for r in result.records if r.request_id not in warmup_ids]
    m = result.metrics
    metrics = summarize(records)
    # Link bytes and peaks are the whole replay's, warm-up included, as on the measured side.
    all_tokens = sum(len(r.release_times) for r in result.records)
    metrics.update(link_bytes=sim.link_bytes, link_bytes_per_output_token=sim.link_bytes / all_tokens
                   if all_tokens else None, peak_device_kv_bytes=m["peak_device_kv_bytes"],
                   total_pauses=m["total_pauses"], num_preemptions=m["num_preemptions"])
    return Prediction(records, metrics, result.sim_wall_s)
