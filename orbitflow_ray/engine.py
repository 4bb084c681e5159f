"""The engine: one step = schedule -> execute -> update, plus request intake and output assembly.

Validation happens in `add_request`, before any state changes, so bad input raises a clear error
and every other request goes on untouched.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace

import torch

from orbitflow_kernels import Direction, make_transfer_engine
from orbitflow_ray.config import EngineConfig
from orbitflow_ray.costmodel import OnlineCostModel
from orbitflow_ray.costmodel.prior import engine_prior
from orbitflow_ray.detokenizer import IncrementalDetokenizer, first_stop
from orbitflow_ray.device_tier import DeviceTier, auto_device_kv_bytes, size_device_tier
from orbitflow_ray.executor.tp import make_tp_executor
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.kv.store import KVStore
from orbitflow_ray.kv.tier_manager import KVTierManager
from orbitflow_ray.model.llama import LlamaModel
from orbitflow_ray.model.loader import load_model, load_spec, load_tokenizer
from orbitflow_ray.model.runner import ModelRunner
from orbitflow_ray.model.spec import ModelSpec
from orbitflow_ray.model.tp import check_tp, weight_bytes_per_shard
from orbitflow_ray.model.tp import kv_bytes_per_token_per_layer as tp_kv_bytes
from orbitflow_ray.outputs import RequestMetrics, RequestOutput, StepRecord
from orbitflow_ray.planner import policy_from_config
from orbitflow_ray.planner.base import CapacityView, RequestView
from orbitflow_ray.request import Request, RequestStatus
from orbitflow_ray.sampling_params import SamplingParams
from orbitflow_ray.sched.loop import StepLoop
from orbitflow_ray.sched.scheduler import Scheduler

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """What a worker reports about its engine at a step boundary (`LLMEngine.snapshot`)."""

    running: tuple[RequestView, ...]  # planner views of the running batch
    num_waiting: int
    num_paused: int  # swapped out by Pause-Resume (not by preemption)
    capacity: CapacityView
    kv: dict[str, int]  # `kv_stats()`: bytes per tier, peaks, transfers, preemptions, steps
    policy_stats: dict[str, float]  # the policy's counters (`KVPolicy.metrics`)
    plan_solver: str | None  # which solver made the plan in force; None: the policy does not plan
    num_steps: int


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        spec = load_spec(config.model)  # fails fast on an unknown model, before loading weights
        check_tp(spec, config.tensor_parallel_size)  # before the prior's roofline splits the model too
        device_name = torch.cuda.get_device_name() if config.backend == "cuda" and torch.cuda.is_available() else None
        self.cost = OnlineCostModel(engine_prior(spec, config.backend, config.link_bandwidth_bytes_per_s,
                                                 _DTYPES[config.dtype].itemsize, config.tensor_parallel_size,
                                                 device_name))
        self.policy = policy_from_config(config, spec.num_layers, self.cost)
        self.transfer = None  # set by _build; close() releases what was made, shard actors included
        try:
            self._build(config, spec, _DTYPES[config.dtype])
        except BaseException:
            self.close()
            raise

    def _build(self, config: EngineConfig, spec: ModelSpec, dtype: torch.dtype) -> None:
        tp = config.tensor_parallel_size  # checked in __init__ (check_tp)
        # Byte budgets and blocks are per shard: a block holds one shard's KV heads (all of them at TP 1).
        self.block_bytes = tp_kv_bytes(spec, tp, dtype.itemsize) * config.block_size
        host_blocks = config.host_kv_bytes // self.block_bytes
        self.max_model_len = min(config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        if tp > 1:  # shard actors load their own weight slices and own their stores (executor/)
            self.spec, self.tokenizer = spec, load_tokenizer(config.model)
            shard_weights = weight_bytes_per_shard(spec, tp, dtype.itemsize)  # what each shard will load
            tier, config = self._size_device_tier(config, shard_weights, dtype.itemsize)
            self.config, device_blocks = config, tier.kv_blocks
            self.runner = make_tp_executor(config, device_blocks, host_blocks)
            self.transfer = self.runner.transfer  # its close() stops the shard actors
        else:
            loaded = load_model(config.model, dtype=dtype, seed=config.seed)
            self.spec, self.tokenizer = loaded.spec, loaded.tokenizer
            weight_bytes = sum(w.numel() * w.element_size() for w in loaded.weights.values())
            tier, config = self._size_device_tier(config, weight_bytes, dtype.itemsize)
            self.config, device_blocks = config, tier.kv_blocks
            self.transfer = make_transfer_engine(config.backend,
                                                 bandwidth_bytes_per_s=config.link_bandwidth_bytes_per_s,
                                                 prefault_device=config.prefault_device_kv)
            store = KVStore(self.transfer, device_blocks, host_blocks, config.block_size, spec.num_kv_heads,
                            spec.head_dim, dtype, config.prefetch_depth, tier.slot_blocks, tier.prompt_blocks)
            self.runner = ModelRunner(LlamaModel(spec, loaded.weights, self.transfer.device), store)
        self.kv = KVTierManager(spec.num_layers, config.block_size, self.block_bytes, device_blocks, host_blocks,
                                tier.slot_blocks, tier.staging_blocks)
        eos = set(spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.scheduler = Scheduler(config, self.kv, self.policy, frozenset(eos), self.max_model_len)
        self.loop = StepLoop(self.scheduler, self.runner, self.cost, self.policy)
        self.eos_token_ids = tuple(sorted(eos))
        if self.tokenizer is not None:
            self.scheduler.detokenize = self._check_stop_strings
        self._ids = itertools.count()
        self.peak_bytes = {Tier.DEVICE: 0, Tier.HOST: 0}
        self.num_steps = 0
        self.step_log: list[StepRecord] | None = None  # set to a list to record every step

    def _size_device_tier(self, config: EngineConfig, weight_bytes: int,
                          itemsize: int) -> tuple[DeviceTier, EngineConfig]:
        """The device tier's split (`device_tier.py`), and the config with its budgets resolved;
        weight_bytes: what this device's weights take (one shard's under tensor parallelism)."""
        auto = config.device_kv_bytes is None
        device_bytes = config.device_kv_bytes
        if auto:
            s = self.spec  # one step's activations: hidden states, q/k/v, the MLP's two projections
            width = 4 * s.hidden_size + 3 * s.intermediate_size + 2 * s.num_heads * s.head_dim
            device_bytes = auto_device_kv_bytes(config, weight_bytes,
                                                4 * config.max_num_batched_tokens * width * itemsize)
        tier = size_device_tier(config, device_bytes, self.block_bytes, -(-self.max_model_len // config.block_size),
                                self.spec.num_layers, auto)
        staging = tier.staging_blocks * self.block_bytes or None
        return tier, replace(config, device_kv_bytes=device_bytes, staging_kv_bytes=staging)

    # ---- intake --------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        params = params or SamplingParams()
        params.check_vocab(self.spec.vocab_size)
        if params.min_tokens and params.eos_token_ids != self.eos_token_ids:
            params = replace(params, eos_token_ids=self.eos_token_ids)  # what min_tokens suppresses
        ids = self._tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context window is {self.max_model_len} tokens "
                             "(prompt plus at least one generated token must fit)")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = Request(rid, ids, params, prompt if isinstance(prompt, str) else None)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        self.scheduler.check_fits(req)
        self.scheduler.add_request(req)
        return rid

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError(f"model {self.config.model!r} has no tokenizer: pass token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.spec.vocab_size}): {bad[:5]}")
        return ids

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        step = self.loop.step()
        out, res = step.out, step.result
        self.num_steps += 1
        if self.step_log is not None and out.seqs:
            self.step_log.append(StepRecord(out.step_id, sum(q.start_pos for q in out.seqs), out.num_batched_tokens,
                                            len(out.seqs), len(res.sampled), step.now - started, res.h2d_bytes,
                                            res.d2h_bytes))
        for tier in self.peak_bytes:
            self.peak_bytes[tier] = max(self.peak_bytes[tier], self.kv.used_bytes(tier))
        return [self._output(req) for req in step.updated]

    def _output(self, req: Request) -> RequestOutput:
        """req's output after a step that gave it a token (its text is decoded by the scheduler's
        stop check, `_check_stop_strings`)."""
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.output_text,
                             list(req.output_token_ids), req.status.finished, req.finish_reason,
                             RequestMetrics(req.arrival_time, list(req.token_times),
                                            list(req.deposit.release_times), req.deposit.slo_s,
                                            req.deposit.num_late, req.paused_s_total, req.num_pauses,
                                            req.sampling_params.ttft_slo_s),
                             new_token_ids=req.output_token_ids[-1:],
                             logprobs=(list(req.output_logprobs) if req.sampling_params.logprobs is not None
                                       else None))

    def _check_stop_strings(self, req: Request, find_stop: bool) -> str | None:
        """Bring req.output_text up to its newest token, decoding only the new tail
        (`IncrementalDetokenizer`); if find_stop, return the first stop string (in the request's
        order) whose match ends in the new text, cutting the text before it."""
        if req.detokenizer is None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer)
        before = req.output_text.rstrip("\ufffd")  # a partial UTF-8 character may decode differently now
        req.output_text = req.detokenizer.update(req.output_token_ids)
        hit = first_stop(req.output_text, len(before), req.sampling_params.stop) if find_stop else None
        if hit is None:
            return None
        req.output_text = req.output_text[:hit[1]]
        return hit[0]

    def kv_stats(self) -> dict[str, int]:
        moved = self.transfer.bytes_moved
        return {
            "device_kv_bytes_used": self.kv.used_bytes(Tier.DEVICE),
            "host_kv_bytes_used": self.kv.used_bytes(Tier.HOST),
            "device_kv_bytes_capacity": self.kv.capacity_bytes(Tier.DEVICE),
            "host_kv_bytes_capacity": self.kv.capacity_bytes(Tier.HOST),
            "device_kv_bytes_used_peak": self.peak_bytes[Tier.DEVICE],
            "host_kv_bytes_used_peak": self.peak_bytes[Tier.HOST],
            "staging_bytes": self.runner.store.staging_bytes,
            "staging_bytes_reserved": self.kv.staging_blocks * self.block_bytes,
            "bytes_h2d": moved.get(Direction.H2D, 0),
            "bytes_d2h": moved.get(Direction.D2H, 0),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_pauses": self.scheduler.num_pauses,
            "max_pause_s": self.scheduler.max_pause_s,
            "num_steps": self.num_steps,
        }

    def policy_stats(self) -> dict[str, float]:
        return self.policy.metrics()

    def snapshot(self) -> EngineSnapshot:
        """The engine's state now, for telemetry (engine thread only)."""
        s = self.scheduler
        return EngineSnapshot(tuple(s.view(r) for r in s.running), len(s.waiting),
                              sum(r.status == RequestStatus.PAUSED for r in s.swapped), s.capacity(),
                              self.kv_stats(), {k: float(v) for k, v in self.policy_stats().items()},
                              self.policy.plan_solver(), self.num_steps)

    def close(self) -> None:
        """Stop the policy's helpers and release the transfer engine, or the shard actors and their
        placement group (tensor parallelism), even if the policy fails to stop. Construction calls it
        when it fails part way, so a failed engine leaves no shard actors behind."""
        try:
            close = getattr(self.policy, "close", None)
            if close is not None:
                close()
        finally:
            if self.transfer is not None:
                self.transfer.close()
