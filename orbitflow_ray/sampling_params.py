"""Per-request generation settings, in the shape vLLM users know.

Penalties, `logit_bias` and `min_tokens` change the logits the sampler draws from (greedy included);
`logprobs` only reports on them. Every field is validated here, so bad input is a ValueError saying
which field and why, before the request reaches the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs (vLLM's default max_logprobs)
PENALTY_RANGE = (-2.0, 2.0)  # presence / frequency penalties, as OpenAI and vLLM bound them
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's bound on a logit_bias value


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
    # OpenAI: subtract presence_penalty once from the logit of each token already generated, and
    # frequency_penalty once per time it was generated (prompt tokens do not count).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Hugging Face / vLLM: a token in the prompt or the output has its logit divided by this when
    # positive, multiplied when negative; 1 is off, > 1 discourages repeats.
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # EOS, stop_token_ids and stop strings cannot end the output before this many tokens (vLLM's).
    min_tokens: int = 0
    # Log-probabilities of each output token and of the `logprobs` likeliest tokens at its position
    # (0: the chosen token's only; None: none). Raw: from the model's logits, before logit_bias,
    # penalties and temperature (vLLM's default, `logprobs_mode="raw_logprobs"`).
    logprobs: int | None = None
    # The model's EOS ids, filled in by the engine when min_tokens is set (`LLMEngine.add_request`),
    # so the sampler keeps them from being drawn (vLLM's `all_stop_token_ids`). Not for callers to set.
    eos_token_ids: tuple[int, ...] = ()
    # Per-token latency SLO (TPOT/TBT) in seconds; None: the engine's default (`tpot_slo_s`).
    slo_s: float | None = None
    # Time-to-first-token SLO in seconds (from arrival to the first token's release); None: the
    # default of whoever judges it (the simulator's prefill-scaled rule, the server's default_ttft_slo_s).
    ttft_slo_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
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
        self._check_logit_fields()

    def _check_logit_fields(self) -> None:
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not lo <= v <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if not _is_real(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be a number > 0 (1: off), got {self.repetition_penalty!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (or None), got {self.logprobs!r}")
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must map token ids to numbers, got {type(self.logit_bias).__name__}")
        blo, bhi = LOGIT_BIAS_RANGE
        for tok, bias in self.logit_bias.items():
            if not _is_int(tok) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {tok!r}")
            if not _is_real(bias) or not blo <= bias <= bhi:
                raise ValueError(f"logit_bias[{tok}] must be a number in [{blo:g}, {bhi:g}], got {bias!r}")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a token id given in these params is not in [0, vocab_size)."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = sorted(t for t in ids if t >= vocab_size)
            if bad:
                raise ValueError(f"{name} token ids must be < the vocabulary size {vocab_size}, got {bad[:5]}")

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 are greedy too (as in vLLM): dividing logits by them overflows."""
        return self.temperature < _GREEDY_BELOW

    @property
    def changes_logits(self) -> bool:
        """True when the sampler must edit this request's logits row before choosing a token."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
