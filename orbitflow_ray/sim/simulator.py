"""The discrete-event simulator: our real Scheduler and policies, a roofline executor.

    from orbitflow_ray.sim.simulator import SimConfig, simulate
    result = simulate(SimConfig.build(model="llama-3.1-8b", gpu="a100-80gb", kv_policy="orbitflow"), trace)

The event loop advances a virtual clock: requests arrive at their trace times; each step is
scheduled by the same `Scheduler` and `KVPolicy` objects the engine runs (built by the same
`policy_from_config`), timed by `SimExecutor` (a roofline over the model and GPU specs, with the
engine's layer-wise prefetch pipeline), and fed back to the online cost model as the engine feeds
its measurements. Planning solves run inline and each that runs the solver's search costs
`solve_cost_s` of virtual time (one settled with no search, a batch that fits on device whole,
costs none), so a run is deterministic under its seed and the planner's cost is never free.

SLOs: every request is judged on TTFT, TPOT and TBT (`orbitflow_ray.metrics`). A request without its
own gets TPOT/TBT SLO = slo_scale x the no-offload decode step at full device KV (`base_step_s`),
and TTFT SLO = slo_scale x (its prefill alone on the device + (prefill chunks + 1) x base_step_s)
(`metrics.default_ttft_slo_s`); `tpot_slo_s` / `ttft_slo_s` replace either rule with seconds.
"""

from __future__ import annotations

import time
import dataclasses
from dataclasses import asdict, dataclass, field, fields

from tqdm.auto import tqdm

from orbitflow_ray.config import DTYPE_BYTES, EngineConfig
from orbitflow_ray.costmodel import OnlineCostModel
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.kv.plan import SchedulerOutput
from orbitflow_ray.kv.tier_manager import KVTierManager
from orbitflow_ray.metrics import RequestRecord, default_ttft_slo_s, record_from_request, summarize
from orbitflow_ray.planner import policy_from_config
from orbitflow_ray.request import Request
from orbitflow_ray.sampling_params import SamplingParams
from orbitflow_ray.sched.loop import StepLoop
from orbitflow_ray.sched.scheduler import Scheduler
from orbitflow_ray.sim.executor import SimExecutor
from orbitflow_ray.sim.hardware import GpuSpec, load_gpu, load_model_spec
from orbitflow_ray.sim.roofline import Roofline
from orbitflow_ray.sim.workload import TraceRequest


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


# The simulator's defaults for the engine fields it reads: a paper-scale GPU server (bf16, the
# paper's batch of up to 16, 8K-token steps and prefill chunks, 512 GiB of pinned host memory).
SIM_ENGINE_DEFAULTS = dict(model="llama-3.1-8b", kv_policy="orbitflow", dtype="bfloat16", host_kv_bytes=512 << 30,
                           max_num_seqs=16, max_num_batched_tokens=8192, prefill_chunk_size=8192,
                           max_pause_s=60.0, solve_ahead=False)


def sim_engine(**fields_: object) -> EngineConfig:
    """An EngineConfig with the simulator's defaults (`SIM_ENGINE_DEFAULTS`), `fields_` over them."""
    return EngineConfig(**{**SIM_ENGINE_DEFAULTS, **fields_})


_ENGINE_FIELDS = frozenset(f.name for f in fields(EngineConfig))
# Engine fields the simulator does not read (it sets tpot_slo_s and solve_ahead itself, SimConfig).
NOT_SIMULATED = ("backend", "gpu_memory_utilization", "staging_kv_bytes", "tpot_slo_s", "solve_ahead")


@dataclass(slots=True)
class SimConfig:
    """A simulated server: the engine config it runs (`engine`) on a GPU spec, and how it is judged.

    The simulator reads of `engine` what the scheduler and policy read (model, kv_policy, admission,
    block size, batch and step budgets, KV budgets, Token-Deposit, Pause-Resume, plan windows, seed),
    plus dtype (bytes per element), tensor_parallel_size (the TP degree), max_model_len and
    link_bandwidth_bytes_per_s (replaces the GPU spec's host link, as the CPU engine emulates it).
    It sets three itself: device_kv_bytes None is sized from the GPU spec (kv_capacity_fraction of
    the HBM left after weights); tpot_slo_s is the run's TPOT SLO (this config's tpot_slo_s, else
    slo_scale x the no-offload step); solve_ahead is off (solves run inline, charged solve_cost_s).
    backend, gpu_memory_utilization and staging_kv_bytes are not modelled.

    `SimConfig.build(**flat)` and `cfg.replace(**flat)` take engine and simulator fields in one list.
    """

    engine: EngineConfig = _help("The engine config simulated (`sim_engine()`: paper-scale defaults).",
                                 default_factory=sim_engine)
    gpu: str = _help("GPU spec (see `orbitflow simulate --list`).", default="a100-80gb")
    kv_capacity_fraction: float = _help(
        "Share of the free HBM given to KV when engine.device_kv_bytes is None. The paper caps KV capacity "
        "well below peak demand to study offloading.", default=1.0)
    slo_scale: float = _help("TPOT/TBT SLO = slo_scale x the no-offload decode step at full device "
                             "KV (the paper's 1, 1.5, 2.5), for requests without one; it scales the "
                             "default TTFT SLO too.", default=1.5)
    tpot_slo_s: float | None = _help("Absolute TPOT/TBT SLO; overrides slo_scale (engine.tpot_slo_s is "
                                     "not read).", default=None)
    ttft_slo_s: float | None = _help(
        "Absolute TTFT SLO for requests without one (inf: not judged). None: the default rule, "
        "slo_scale x (the request's prefill on an idle device + one no-offload decode step per "
        "prefill chunk + one), see metrics.default_ttft_slo_s.", default=None)
    solve_cost_s: float = _help("Virtual time charged per planning solve that runs the solver's search "
                                "(the fast path's measured p50 at 32 requests on a CPU core is ~5 ms); "
                                "a batch that fits on device whole is planned with no search, at no "
                                "charge (`OrbitFlow.num_solves`).", default=0.005)

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise TypeError(f"engine must be an EngineConfig, got {type(self.engine).__name__}")
        if not isinstance(self.gpu, str) or not self.gpu:
            raise ValueError(f"gpu must name a GPU spec, got {self.gpu!r}")
        if not 0 < self.kv_capacity_fraction <= 1:
            raise ValueError(f"kv_capacity_fraction must be in (0, 1], got {self.kv_capacity_fraction}")
        if not self.slo_scale > 0:
            raise ValueError(f"slo_scale must be positive, got {self.slo_scale}")
        if not self.solve_cost_s >= 0:
            raise ValueError(f"solve_cost_s must be >= 0, got {self.solve_cost_s}")
        for name in ("tpot_slo_s", "ttft_slo_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive seconds when set, got {value!r}")

    @classmethod
    def build(cls, **flat: object) -> SimConfig:
        """A config from one flat list of fields: EngineConfig's go to `engine` (over the
        simulator's defaults), the rest to SimConfig; tpot_slo_s is SimConfig's. TypeError names
        a field neither has."""
        return cls().replace(**flat)

    def replace(self, **flat: object) -> SimConfig:
        """A copy with fields changed, taken as in `build` (an engine field changes `engine`)."""
        own = {f.name for f in fields(self)}
        unknown = sorted(set(flat) - own - _ENGINE_FIELDS)
        if unknown:
            raise TypeError(f"SimConfig has no field {', '.join(map(repr, unknown))} (nor has EngineConfig)")
        engine_kw = {k: v for k, v in flat.items() if k not in own}
        sim_kw = {k: v for k, v in flat.items() if k in own}
        if engine_kw:
            sim_kw["engine"] = dataclasses.replace(sim_kw.get("engine", self.engine), **engine_kw)
        return dataclasses.replace(self, **sim_kw)

    def to_dict(self) -> dict:
        """Flat: the engine fields the simulator reads, then the simulator's (for reports)."""
        engine = {k: v for k, v in asdict(self.engine).items() if k not in NOT_SIMULATED}
        return {**engine, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "engine"}}

    @property
    def dtype_bytes(self) -> int:
        """Bytes per weight and KV element of engine.dtype."""
        return DTYPE_BYTES[self.engine.dtype]

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


@dataclass(slots=True)
class SimResult:
    config: SimConfig
    records: list[RequestRecord]
    metrics: dict
    policy_metrics: dict
    tpot_slo_s: float
    sim_wall_s: float  # real seconds the simulation took

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "metrics": self.metrics, "policy": self.policy_metrics,
                "tpot_slo_s": self.tpot_slo_s, "sim_wall_s": self.sim_wall_s}


class Simulator:
    def __init__(self, cfg: SimConfig, gpu: GpuSpec | None = None) -> None:
        """`gpu`: a spec object (e.g. freshly calibrated) instead of `cfg.gpu`'s name or file."""
        self.cfg = cfg
        e = cfg.engine
        self.spec = load_model_spec(e.model)
        gpu = gpu or load_gpu(cfg.gpu)
        if e.link_bandwidth_bytes_per_s is not None:  # the CPU engine's emulated link, copied as is
            gpu = gpu.replace(host_link_bytes_per_s=e.link_bandwidth_bytes_per_s, host_link_efficiency=1.0)
        self.roofline = Roofline(self.spec, gpu, e.tensor_parallel_size, cfg.dtype_bytes)
        kvb = self.roofline.kv_bytes_per_token_per_layer
        device = e.device_kv_bytes
        if device is None:
            device = int(self.roofline.device_kv_capacity_bytes() * cfg.kv_capacity_fraction)
        block_bytes = kvb * e.block_size
        if device < block_bytes:
            raise ValueError(f"device KV budget {device} B holds no {e.block_size}-token block of "
                             f"{e.model} on {cfg.gpu} (TP {e.tensor_parallel_size})")
        L = self.spec.num_layers
        full_tokens = device // (kvb * L)
        B = e.max_num_seqs
        self.base_step_s = self.roofline.step_compute_s(full_tokens, B, B, B)
        self.tpot_slo_s = cfg.tpot_slo_s or cfg.slo_scale * self.base_step_s
        self.prefill_chunk = min(e.prefill_chunk_size, e.max_num_batched_tokens)  # the scheduler's
        self._idle_prefill: dict[int, tuple[float, int]] = {}
        self.engine_config = dataclasses.replace(e, device_kv_bytes=device, tpot_slo_s=self.tpot_slo_s,
                                                 solve_ahead=False)
        self.kv = KVTierManager(L, e.block_size, block_bytes, device // block_bytes, e.host_kv_bytes // block_bytes)
        self.cost = OnlineCostModel(self.roofline.cost_model(B, max(1, full_tokens // B)))
        self.policy = policy_from_config(self.engine_config, L, self.cost)
        self.clock = 0.0
        self.scheduler = Scheduler(self.engine_config, self.kv, self.policy, frozenset(),
                                   e.max_model_len or self.spec.max_position_embeddings, clock=lambda: self.clock,
                                   snapshot_tables=False)
        self.executor = SimExecutor(self.roofline, e.block_size, e.prefetch_depth, clock=lambda: self.clock)
        self.loop = StepLoop(self.scheduler, self.executor, self.cost, self.policy, advance=self._advance,
                             schedule=self._schedule, skip_empty=True)
        self.link_bytes = 0
        self.num_steps = 0
        self.peak_device_bytes = 0

    def idle_prefill(self, input_tokens: int) -> tuple[float, int]:
        """(seconds, steps) of a prompt's chunked prefill alone on the device, all its KV there:
        the roofline time of each chunk the scheduler would cut, the last one sampling."""
        if input_tokens not in self._idle_prefill:
            total, done, steps = 0.0, 0, 0
            while done < input_tokens:
                chunk = min(self.prefill_chunk, input_tokens - done)
                total += self.roofline.step_compute_s(done, chunk, 1, int(done + chunk == input_tokens))
                done, steps = done + chunk, steps + 1
            self._idle_prefill[input_tokens] = (total, steps)
        return self._idle_prefill[input_tokens]

    def ttft_slo_s(self, input_tokens: int) -> float:
        """The TTFT SLO of a request without its own: cfg.ttft_slo_s, else the default rule
        (`metrics.default_ttft_slo_s` over this request's idle prefill and the no-offload step)."""
        if self.cfg.ttft_slo_s is not None:
            return self.cfg.ttft_slo_s
        return default_ttft_slo_s(*self.idle_prefill(input_tokens), self.base_step_s, self.cfg.slo_scale)

    def _arrive(self, t: TraceRequest, failed: list[RequestRecord]) -> Request | None:
        ttft_slo = t.ttft_slo_s or self.ttft_slo_s(t.input_tokens)
        sp = SamplingParams(max_tokens=t.output_tokens, ignore_eos=True, slo_s=t.tpot_slo_s, ttft_slo_s=ttft_slo)
        req = Request(t.request_id, [0] * t.input_tokens, sp, arrival_time=t.arrival_s)
        try:
            if t.input_tokens + t.output_tokens > self.spec.max_position_embeddings:
                raise ValueError(f"{t.input_tokens}+{t.output_tokens} tokens exceed the context window")
            self.scheduler.check_fits(req)
        except ValueError:  # rejected on arrival: reported as failed, never silently dropped
            failed.append(RequestRecord(t.request_id, t.arrival_s, t.input_tokens, (),
                                        t.tpot_slo_s or self.tpot_slo_s, ttft_slo, finished=False))
            return None
        self.scheduler.add_request(req)
        return req

    def run(self, trace: list[TraceRequest], progress: bool = False) -> SimResult:
        started = time.perf_counter()
        pending = sorted(trace, key=lambda t: t.arrival_s)
        admitted: list[Request] = []
        failed: list[RequestRecord] = []
        i, sched = 0, self.scheduler
        bar = tqdm(total=len(pending), desc=f"sim {self.cfg.engine.kv_policy}", disable=not progress, leave=False)
        while i < len(pending) or sched.has_unfinished():
            while i < len(pending) and pending[i].arrival_s <= self.clock:
                req = self._arrive(pending[i], failed)
                admitted += [req] if req is not None else []
                i += 1
            if not sched.has_unfinished():
                if i == len(pending):
                    break  # the last arrivals were all rejected: nothing left to run
                self.clock = pending[i].arrival_s
                continue
            if not self._step():
                if i == len(pending):
                    break  # nothing can run and nothing will arrive: the rest is reported failed
                self.clock = max(self.clock, pending[i].arrival_s)  # wait for an arrival
            if progress:  # counting finished requests every step costs O(requests)
                bar.n = sum(r.status.finished for r in admitted) + len(failed)
                bar.refresh()
        bar.close()
        records = [record_from_request(r) for r in admitted] + failed
        metrics = summarize(records, link_bytes=self.link_bytes)
        metrics.update(num_steps=self.num_steps, peak_device_kv_bytes=self.peak_device_bytes,
                       device_kv_capacity_bytes=self.kv.capacity_bytes(Tier.DEVICE),
                       num_preemptions=sched.num_preemptions, num_pauses_sched=sched.num_pauses,
                       num_placement_failures=sched.num_placement_failures)
        return SimResult(self.cfg, records, metrics, self.policy.metrics(), self.tpot_slo_s,
                         time.perf_counter() - started)

    def _step(self) -> bool:
        """One scheduled step on the virtual clock; False when nothing was runnable."""
        step = self.loop.step()
        if step is None:
            return False
        self.link_bytes += step.result.h2d_bytes + step.result.d2h_bytes
        self.num_steps += 1
        return True

    def _schedule(self) -> SchedulerOutput:
        """The scheduler's plan, its planning solves charged to the clock (`solve_cost_s` each)."""
        solves = self._solves()
        out = self.scheduler.schedule()
        self.clock += (self._solves() - solves) * self.cfg.solve_cost_s
        if not out.is_empty:  # blocks are taken at schedule and freed at update: the peak is now
            used = self.kv.used_bytes(Tier.DEVICE)
            assert used <= self.kv.capacity_bytes(Tier.DEVICE), "device KV over capacity"
            self.peak_device_bytes = max(self.peak_device_bytes, used)
        return out

    def _advance(self, wall_s: float) -> float:
        self.clock += wall_s
        return self.clock

    def _solves(self) -> int:
        return self.policy.num_solves()


def simulate(cfg: SimConfig, trace: list[TraceRequest], progress: bool = False,
             gpu: GpuSpec | None = None) -> SimResult:
    return Simulator(cfg, gpu).run(trace, progress)
