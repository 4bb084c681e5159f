"""Request fields that OpenAI or vLLM define and OrbitFlow does not implement, with the values that ask
for nothing: a request may send those (clients often send defaults), any other value is a 400 that
names the field, never accepted and dropped.

Enabling a field is one change: delete its row here and declare it, typed, on the request model in
`protocol.py` (then pass it to `SamplingParams` in `openai_service.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_core import PydanticCustomError


@dataclass(frozen=True, slots=True)
class Refused:
    neutral: tuple[Any, ...]  # values that ask for nothing; null always does
    why: str


def _not_yet(neutral: Any) -> Refused:
    return Refused((neutral,), f"not supported yet (only {neutral!r})")


# Sampling fields are all implemented (protocol.py declares them); `best_of` is checked there (== n).
SAMPLING: dict[str, Refused] = {}
COMPLETION: dict[str, Refused] = {
    **SAMPLING,
    "echo": Refused((False,), "not supported"),
    "suffix": Refused(("",), "not supported"),
}
CHAT: dict[str, Refused] = {
    **SAMPLING,
    # JSON mode needs grammar-constrained decoding (a token mask per step). xgrammar 0.2.9 is on PyPI
    # here (`pip download` fetched it) but is not wired into the sampler, so JSON modes are refused.
    "response_format": Refused(({"type": "text"},), 'not supported (only {"type": "text"}): JSON mode needs '
                                                    "constrained decoding, which this server does not do yet"),
    "tools": Refused(([],), "tools are not supported"),
    "tool_choice": Refused(("none",), "tools are not supported (only \"none\")"),
    "parallel_tool_calls": Refused((True, False), "tools are not supported"),  # no-op without tools
    "functions": Refused(([],), "functions are not supported"),
    "function_call": Refused(("none",), "functions are not supported (only \"none\")"),
}
# Fields of a chat message: what the openai client writes when an assistant reply is sent back.
MESSAGE: dict[str, Refused] = {
    "tool_calls": Refused(([],), "tool calls in the conversation are not supported"),
    "function_call": Refused((), "function calls in the conversation are not supported"),
    "tool_call_id": Refused((), "tool call ids are not supported (tools are not)"),
    "name": Refused((), "participant names are not supported"),
    "refusal": Refused((), "refusals in the conversation are not supported"),
    "audio": Refused((), "audio is not supported"),
    "annotations": Refused(([],), "annotations are not supported"),
}


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):  # True is not 1 here
        return value is neutral
    return value == neutral


def strip_neutral(data: dict, table: dict[str, Refused]) -> dict:
    """`data` without the table's fields set to neutral values (or null). Raises a pydantic error
    whose context names the first field set to anything else (`validation_error_message` reads it)."""
    for name, value in data.items():
        rule = table.get(name)
        if rule is not None and value is not None and not any(_same(value, n) for n in rule.neutral):
            raise PydanticCustomError("unsupported_field", "{why}", {"why": rule.why, "param": name})
    return {k: v for k, v in data.items() if k not in table}
