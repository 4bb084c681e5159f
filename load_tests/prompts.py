"""Prompt text of a wanted length in tokens.

With the model's tokenizer the length is exact (checked by re-encoding the text); without one it is
approximate: one common short English word per token, which is what GPT-style BPE vocabularies
give for such words. Each request gets its own word order, so a server's prefix cache cannot serve
one prompt from another's.
"""

from __future__ import annotations

import random

# Common, short, single-token words in every BPE vocabulary we have seen (with a leading space).
_WORDS = ("time year people way day man thing woman life child world school state family student "
          "group country problem hand part place case week company system program question work "
          "government number night point home water room mother area money story fact month lot "
          "right study book eye job word business issue side kind head house service friend father "
          "power hour game line end member law car city community name president team minute idea "
          "kid body information back parent face others level office door health person art war "
          "history party result change morning reason research girl guy moment air teacher force "
          "education river light stone green blue red open small large long short old new good "
          "great little high low early late young public able free full hard real sure clear").split()
_FIX_UP_ROUNDS = 8


def load_prompt_tokenizer(name: str | None):
    """The tokenizer of `name` if this machine has it (never downloads), else None."""
    if not name:
        return None
    try:
        from orbitflow_ray.model.loader import load_tokenizer

        return load_tokenizer(name)
    except Exception:  # an unknown or remote model: prompts are sized approximately
        return None


class PromptBuilder:
    def __init__(self, tokenizer=None, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.seed = seed

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def _words(self, index: int, n: int) -> list[str]:
        rng = random.Random(f"{self.seed}-{index}")
        words: list[str] = []
        while len(words) < n:
            chunk = list(_WORDS)
            rng.shuffle(chunk)
            words += chunk
        return words[:n]

    def build(self, index: int, num_tokens: int) -> str:
        """Text of `num_tokens` tokens (exactly, with a tokenizer) for request number `index`."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        words = self._words(index, num_tokens + 8)
        if self.tokenizer is None:
            return " ".join(words[:num_tokens])
        return self._exact(words, num_tokens)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _exact(self, words: list[str], n: int) -> str:
        ids = self._encode(" ".join(words))
        while len(ids) < n:  # never for our words (one token or more each), but cheap to guard
            ids += ids
        # Cutting ids and decoding can re-encode to a different count at the cut (BPE merges), so
        # nudge the cut until the text re-encodes to exactly n tokens.
        k = n
        for _ in range(_FIX_UP_ROUNDS):
            text = self.tokenizer.decode(ids[:k])
            got = len(self._encode(text))
            if got == n:
                return text
            k = max(1, k + n - got)
        raise ValueError(f"could not make a prompt of exactly {n} tokens with this tokenizer")

    def count(self, text: str) -> int | None:
        return len(self._encode(text)) if self.tokenizer is not None else None
