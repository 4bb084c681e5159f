"""The simulator's prediction of a load test: the same trace (arrivals, lengths, SLOs) replayed
through `orbitflow_ray.sim.simulator` with the app's engine config and a GPU spec (`cpu-2core`:
this machine, calibrated).

The client's concurrency cap is not modelled: every request reaches the simulated server at its
trace arrival.
"""

from __future__ import annotations

from dataclasses import dataclass

from orbitflow_ray.metrics import RequestRecord, summarize
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.sim.hardware import load_gpu
from orbitflow_ray.sim.simulator import SimConfig, Simulator
from orbitflow_ray.sim.workload import TraceRequest

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def sim_config(args: AppArgs, gpu: str) -> SimConfig:
    """The simulator's view of the app's (first) worker engine."""
    e = args.engine_config()
    return SimConfig(model=e.model, gpu=gpu, dtype_bytes=_DTYPE_BYTES.get(e.dtype, 2), kv_policy=e.kv_policy,
                     admission=e.admission, device_kv_bytes=e.device_kv_bytes, host_kv_bytes=e.host_kv_bytes,
                     block_size=e.block_size,
                     max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
                     prefill_chunk_size=e.prefill_chunk_size, prefetch_depth=e.prefetch_depth,
                     tpot_slo_s=e.tpot_slo_s, ttft_slo_s=args.default_ttft_slo_s, token_deposit=e.token_deposit,
                     pause_strategy=e.pause_strategy, max_pause_s=e.max_pause_s, plan_windows=e.plan_windows,
                     seed=e.seed)


@dataclass(slots=True)
class Prediction:
    records: list[RequestRecord]  # the measured requests only (warm-up left out, as in the measurement)
    metrics: dict
    sim_wall_s: float


def predict(trace: list[TraceRequest], args: AppArgs, gpu: str = "cpu-2core",
            warmup_ids: frozenset[str] = frozenset()) -> Prediction:
    cfg = sim_config(args, gpu)
    spec = load_gpu(gpu)
    link = args.engine_config().link_bandwidth_bytes_per_s
    if link is not None:  # the CPU engine's emulated host link, copied as is (as calibration does)
        spec = spec.replace(host_link_bytes_per_s=link, host_link_efficiency=1.0)
    sim = Simulator(cfg, spec)
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
