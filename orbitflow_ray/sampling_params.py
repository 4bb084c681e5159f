"""Per-request generation settings, in the shape vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field


_GREEDY_BELOW = 1e-5


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy: the token-identical-to-HF mode
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Per-token latency SLO (TPOT/TBT) in seconds; None: the engine's default (`tpot_slo_s`).
    slo_s: float | None = None
    # Time-to-first-token SLO in seconds (from arrival to the first token's release); None: the
    # default of whoever judges it (the simulator's prefill-scaled rule, the server's default_ttft_slo_s).
    ttft_slo_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.slo_s is not None and not self.slo_s > 0:
            raise ValueError(f"slo_s must be positive seconds, got {self.slo_s}")
        if self.ttft_slo_s is not None and not self.ttft_slo_s > 0:
            raise ValueError(f"ttft_slo_s must be positive seconds, got {self.ttft_slo_s}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy too (as in vLLM): dividing logits by them overflows."""
        return self.temperature < _GREEDY_BELOW
