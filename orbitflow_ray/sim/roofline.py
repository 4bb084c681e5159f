"""Roofline step times for a Llama-family model on one GPU (of a tensor-parallel group).

    rl = Roofline(load_model_spec("llama-3.1-8b"), load_gpu("a100-80gb"))
    rl.step_compute_s(context_tokens=16_000, new_tokens=16, num_seqs=16, num_sampled=16)

As in Vidur, a step is the sum of per-operator times and each operator takes
max(FLOPs / achieved FLOP/s, bytes / achieved HBM bandwidth): whichever of compute and memory
traffic it is bound by. That one rule covers both phases: a decode step's linears read every weight
for a handful of tokens (memory-bound: an 8B model's decode is ~16 GB of weights at ~2 TB/s), while a
prefill chunk multiplies those weights by thousands of tokens (compute-bound). Attention reads the
KV of every cached token for ~nh/nkv FLOPs a byte, far below any GPU's ridge point, so decode
attention is KV-bytes bound and a layer's time grows linearly with context: the form the planner's
`CostModel` (a + b * context + p * new tokens) assumes, which `cost_model()` derives from here.

Tensor parallelism (Megatron layout) gives each GPU 1/tp of the heads and MLP columns, hence 1/tp of
the layers' weights and of the KV (the embedding, final norm and LM head stay whole on every GPU and
one GPU computes the logits, as the engine's shards do), and adds two all-reduces of the hidden states per layer (after attention and
after the MLP), timed as a ring: 2 (tp-1) hops of latency plus 2 (tp-1)/tp of the bytes over the link.
KV heads per GPU and all-reduces per layer come from `model/tp.py`, the layout the engine's shards
run, so the simulator and the engine count the same KV and weight bytes per shard and all-reduces
per step.
"""

from __future__ import annotations

from orbitflow_ray.costmodel import CostModel
from orbitflow_ray.model.spec import ModelSpec
from orbitflow_ray.model.tp import (ALLREDUCES_PER_LAYER, allreduces_per_step, kv_heads_per_shard,
                                    weight_bytes_per_shard)
from orbitflow_ray.sim.hardware import GpuSpec

_LOGIT_BYTES = 4  # the LM head writes fp32 logits for sampling


class Roofline:
    def __init__(self, model: ModelSpec, gpu: GpuSpec, tp: int = 1, dtype_bytes: int = 2) -> None:
        if tp < 1 or dtype_bytes < 1:
            raise ValueError(f"need tp >= 1 and dtype_bytes >= 1, got tp={tp}, dtype_bytes={dtype_bytes}")
        if model.num_heads % tp or model.intermediate_size % tp:
            raise ValueError(f"tp={tp} must divide num_heads={model.num_heads} and "
                             f"intermediate_size={model.intermediate_size} of {model.name}")
        self.model, self.gpu, self.tp, self.dtype_bytes = model, gpu, tp, dtype_bytes
        self.heads = model.num_heads // tp
        # With fewer KV heads than GPUs each KV head is replicated, as vLLM does.
        self.kv_heads = kv_heads_per_shard(model, tp)
        self.inter = model.intermediate_size // tp
        self.kv_bytes_per_token_per_layer: int = 2 * self.kv_heads * model.head_dim * dtype_bytes
        # The embedding and LM head are replicated on every GPU, as the engine's shards hold them.
        self.weight_bytes_per_gpu: int = weight_bytes_per_shard(model, tp, dtype_bytes)
        self.allreduces_per_step: int = allreduces_per_step(model, tp)  # per GPU, whatever the batch

    # --- per-operator roofline -------------------------------------------------------------------

    def _op_s(self, flops: float, nbytes: float) -> float:
        return max(flops / self.gpu.flops, nbytes / self.gpu.memory_bytes_per_s)

    def _linear_s(self, tokens: int, k_in: int, n_out: int, out_bytes: int | None = None) -> float:
        """[tokens, k_in] x [k_in, n_out]: the weight is read once whatever the token count."""
        db = self.dtype_bytes
        nbytes = db * (k_in * n_out + tokens * k_in) + (out_bytes or db) * tokens * n_out
        return self._op_s(2.0 * tokens * k_in * n_out, nbytes)

    def _attention_s(self, context_tokens: int, new_tokens: int, num_seqs: int) -> float:
        """New tokens attend to their sequence's cached context and causally to each other.

        Only batch totals are known, so sequences are taken as equal: each has C/S cached and T/S
        new tokens. Exact for decode (T = S); mixed prefill/decode batches are approximated.
        """
        hd, T, C, S = self.model.head_dim, new_tokens, context_tokens, num_seqs
        attended = T * C / S + T * (T / S + 1) / 2  # (query, key) pairs
        flops = 4.0 * self.heads * hd * attended  # QK^T and PV, 2 FLOPs per multiply-add
        nbytes = (C + T) * self.kv_bytes_per_token_per_layer + 2 * T * self.heads * hd * self.dtype_bytes
        # KV reads have their own efficiency: paged gathers stream worse than weight reads (and on
        # our CPU path each request's KV is gathered into a contiguous copy first).
        kv_bw = self.gpu.hbm_bytes_per_s * (self.gpu.kv_read_efficiency or self.gpu.memory_efficiency)
        return max(flops / self.gpu.flops, nbytes / kv_bw)

    def _elementwise_s(self, tokens: int) -> float:
        """Unfused memory-bound ops: 2 RMSNorms and 2 residual adds over hidden, RoPE on q and k,
        SiLU(gate) * up over the MLP columns (each reads and writes its tensors once)."""
        m = self.model
        per_token = 10 * m.hidden_size + 2 * (self.heads + self.kv_heads) * m.head_dim + 3 * self.inter
        return self._op_s(0.0, tokens * per_token * self.dtype_bytes)

    def allreduce_s(self, new_tokens: int) -> float:
        """One ring all-reduce of the [new_tokens, hidden] activations across the TP group."""
        if self.tp == 1:
            return 0.0
        nbytes = new_tokens * self.model.hidden_size * self.dtype_bytes
        hops = 2 * (self.tp - 1)
        return (hops * self.gpu.interconnect_latency_s
                + hops / self.tp * nbytes / self.gpu.interconnect_effective_bytes_per_s)

    # --- step times --------------------------------------------------------------------------------

    def layer_time_s(self, context_tokens: int, new_tokens: int, num_seqs: int) -> float:
        """One transformer layer of one step on one GPU.

        context_tokens: cached tokens the batch attends over (sum over sequences, before this step);
        new_tokens: tokens computed this step (decode: one per sequence; prefill: the chunk).
        """
        if new_tokens < 1 or num_seqs < 1 or context_tokens < 0 or num_seqs > new_tokens:
            raise ValueError(f"need new_tokens >= num_seqs >= 1 and context_tokens >= 0, got "
                             f"{context_tokens=}, {new_tokens=}, {num_seqs=}")
        h, hd, T = self.model.hidden_size, self.model.head_dim, new_tokens
        linears = (self._linear_s(T, h, self.heads * hd)  # q
                   + 2 * self._linear_s(T, h, self.kv_heads * hd)  # k, v
                   + self._linear_s(T, self.heads * hd, h)  # o
                   + 2 * self._linear_s(T, h, self.inter)  # gate, up
                   + self._linear_s(T, self.inter, h))  # down
        return (linears + self._attention_s(context_tokens, T, num_seqs) + self._elementwise_s(T)
                + ALLREDUCES_PER_LAYER * self.allreduce_s(T) + self.gpu.per_layer_overhead_s
                + num_seqs * self.gpu.per_seq_layer_overhead_s)

    def head_time_s(self, num_sampled: int, new_tokens: int) -> float:
        """Embedding gather and final norm over every new token, the LM head over the rows that
        sample (a prefill chunk that does not end its prompt samples nothing), plus the per-step
        framework overhead. Under TP the LM head is replicated and one GPU (the engine's rank 0)
        computes every logit and samples: no gather, and the step waits for that GPU."""
        if not 0 <= num_sampled <= new_tokens:
            raise ValueError(f"need 0 <= num_sampled <= new_tokens, got {num_sampled=}, {new_tokens=}")
        h, db = self.model.hidden_size, self.dtype_bytes
        t = self._op_s(0.0, 4 * new_tokens * h * db)  # gather rows + norm, each read and written
        if num_sampled:
            t += self._linear_s(num_sampled, h, self.model.vocab_size, out_bytes=_LOGIT_BYTES)
        return t + self.gpu.per_step_overhead_s

    def step_compute_s(self, context_tokens: int, new_tokens: int, num_seqs: int, num_sampled: int) -> float:
        """A whole step with every layer's KV on device (no transfers)."""
        return (self.model.num_layers * self.layer_time_s(context_tokens, new_tokens, num_seqs)
                + self.head_time_s(num_sampled, new_tokens))

    # --- memory and link ---------------------------------------------------------------------------

    def device_kv_capacity_bytes(self, memory_fraction: float = 0.9, activation_reserve_bytes: int = 2 << 30) -> int:
        """HBM left for KV on one GPU: the usable fraction, less weights and an activation reserve
        (vLLM's gpu_memory_utilization accounting). 0 when the weights do not even fit."""
        if not 0 < memory_fraction <= 1 or activation_reserve_bytes < 0:
            raise ValueError(f"need 0 < memory_fraction <= 1 and activation_reserve_bytes >= 0, got "
                             f"{memory_fraction=}, {activation_reserve_bytes=}")
        free = self.gpu.hbm_bytes * memory_fraction - self.weight_bytes_per_gpu - activation_reserve_bytes
        return max(0, int(free))

    def transfer_s(self, nbytes: int) -> float:
        """Host <-> device copy time at the measured-effective link bandwidth."""
        return nbytes / self.gpu.link_bytes_per_s

    # --- linearisation for the planner -----------------------------------------------------------

    def cost_model(self, batch_size: int, typical_context: int) -> CostModel:
        """The planner's linear model, tangent to the roofline at a decode batch of `batch_size`
        requests of `typical_context` cached tokens each.

        b and p are central finite differences of the layer time in context and in new tokens (one
        per request, as in decode); a is then chosen so the line passes through the anchor exactly.
        The roofline is piecewise linear, so the line is exact until an operator changes bound;
        prefill-heavy steps (compute-bound linears) are what the online fit corrects.
        """
        if batch_size < 1 or typical_context < 0:
            raise ValueError(f"need batch_size >= 1 and typical_context >= 0, got {batch_size=}, {typical_context=}")
        S, C0 = batch_size, batch_size * typical_context
        dc, ds = max(1, C0 // 10), max(1, S // 4)

        def decode(c: int, s: int) -> float:
            return self.layer_time_s(c, s, s)

        c_lo, s_lo = max(0, C0 - dc), max(1, S - ds)
        b = (decode(C0 + dc, S) - decode(c_lo, S)) / (C0 + dc - c_lo)
        p = (decode(C0, S + ds) - decode(C0, s_lo)) / (S + ds - s_lo)
        b, p = max(b, 0.0), max(p, 0.0)
        # The head (LM head, sampling, step overhead) is spread over the layers, as the online fit
        # does with measured step times, so L * layer time predicts the whole decode step.
        tail = self.head_time_s(S, S)
        a = decode(C0, S) + tail / self.model.num_layers - b * C0 - p * S
        return CostModel(self.model.num_layers, compute_a_s=max(a, 1e-9), compute_b_s_per_token=b,
                         compute_p_s_per_token=p, link_bytes_per_s=self.gpu.link_bytes_per_s, step_tail_s=tail,
                         copy_compute_s_per_byte=self.gpu.copy_compute_s_per_byte)
