"""Incremental detokenization: each step decodes a request's newest tokens, not its whole output.

vLLM's scheme (`detokenize_incrementally`): two offsets into the output ids. Text up to `read` is
final; the tokens from `prefix` to `read` are decoded again with the new ones as context, and the
new text is what the longer decode adds to the shorter one. Context matters to tokenizers that
merge or strip spaces at the start of a decode, and a character whose UTF-8 bytes span several
tokens decodes as U+FFFD until its last byte arrives: such a tail stays pending (shown, not
committed), so the text always equals a decode of all the ids so far, at O(new tokens) per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_PENDING = "\ufffd"


class IncrementalDetokenizer:
    __slots__ = ("tokenizer", "skip_special_tokens", "text", "prefix", "read")

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""  # the final text of ids[:read]
        self.prefix = 0
        self.read = 0

    def update(self, ids: Sequence[int]) -> str:
        """The text of all of `ids` (the output so far, which only ever grows at the end)."""
        if len(ids) < self.read:
            raise ValueError(f"output ids shrank from {self.read} to {len(ids)} tokens")
        if len(ids) == self.read:
            return self.text
        known = self._decode(ids[self.prefix:self.read])
        new = self._decode(ids[self.prefix:])
        delta = new[len(known):]
        if new.endswith(_PENDING):
            return self.text + delta  # a character still missing bytes: decode it again next time
        self.text += delta
        self.prefix, self.read = self.read, len(ids)
        return self.text

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)


def first_stop(text: str, checked: int, stops: Sequence[str]) -> tuple[str, int] | None:
    """The first stop string (in `stops` order) that occurs in `text` ending after `text[:checked]`
    (earlier matches would have stopped an earlier step), and where it starts; None if none."""
    for stop in stops:
        at = text.find(stop, max(0, checked - len(stop) + 1))
        if at >= 0:
            return stop, at
    return None
