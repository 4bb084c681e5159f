"""OpenAI response bodies and stream events, as plain dicts in OpenAI's exact shapes, so the official
`openai` client parses them unchanged. Re-exported by `protocol`, where callers find them."""

from __future__ import annotations

import json

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason_openai(engine_reason: str | None) -> str | None:
    """OpenAI knows only "stop" and "length" for us; an abort ended the text, so it reads as "stop"."""
    if engine_reason is None:
        return None
    return "length" if engine_reason == "length" else "stop"


def _envelope(request_id: str, obj: str, created: int, model: str, choices: list[dict],
              usage_: dict | None) -> dict:
    out = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def completion_response(request_id: str, model: str, created: int, text: str, finish_reason: str | None,
                        prompt_tokens: int, completion_tokens: int) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _envelope(request_id, "text_completion", created, model, [choice],
                     usage(prompt_tokens, completion_tokens))


def chat_response(request_id: str, model: str, created: int, text: str, finish_reason: str | None,
                  prompt_tokens: int, completion_tokens: int) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason}
    return _envelope(request_id, "chat.completion", created, model, [choice],
                     usage(prompt_tokens, completion_tokens))


def completion_chunk(request_id: str, model: str, created: int, text: str,
                     finish_reason: str | None = None, usage: dict | None = None) -> dict:
    """One streamed /v1/completions event. A chunk with usage, no text and no finish_reason is the
    usage-only final chunk of `stream_options.include_usage`, so it has no choices."""
    usage_only = usage is not None and not text and finish_reason is None
    choices = [] if usage_only else [{"index": 0, "text": text, "logprobs": None,
                                      "finish_reason": finish_reason}]
    return _envelope(request_id, "text_completion", created, model, choices, usage)


def chat_chunk(request_id: str, model: str, created: int, delta_text: str | None,
               finish_reason: str | None = None, first: bool = False, usage: dict | None = None) -> dict:
    """One streamed chat event; the first carries the assistant role, as OpenAI's does. A chunk with
    only usage is the final chunk of `stream_options.include_usage`, so it has no choices."""
    usage_only = usage is not None and delta_text is None and finish_reason is None and not first
    delta: dict[str, str] = {"role": "assistant"} if first else {}
    if delta_text is not None:
        delta["content"] = delta_text
    choices = [] if usage_only else [{"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish_reason}]
    return _envelope(request_id, "chat.completion.chunk", created, model, choices, usage)


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def models_response(model_ids: list[str], created: int, owned_by: str = "orbitflow") -> dict:
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": owned_by}
                                       for m in model_ids]}
