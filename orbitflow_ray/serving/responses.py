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


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def completion_response_of(request_id: str, model: str, created: int, choices: list[dict], usage_: dict) -> dict:
    return _envelope(request_id, "text_completion", created, model, choices, usage_)


def chat_response_of(request_id: str, model: str, created: int, choices: list[dict], usage_: dict) -> dict:
    return _envelope(request_id, "chat.completion", created, model, choices, usage_)


def completion_response(request_id: str, model: str, created: int, text: str, finish_reason: str | None,
                        prompt_tokens: int, completion_tokens: int) -> dict:
    return completion_response_of(request_id, model, created, [completion_choice(0, text, finish_reason)],
                                  usage(prompt_tokens, completion_tokens))


def chat_response(request_id: str, model: str, created: int, text: str, finish_reason: str | None,
                  prompt_tokens: int, completion_tokens: int) -> dict:
    return chat_response_of(request_id, model, created, [chat_choice(0, text, finish_reason)],
                            usage(prompt_tokens, completion_tokens))


def completion_chunk(request_id: str, model: str, created: int, text: str,
                     finish_reason: str | None = None, usage: dict | None = None, index: int = 0,
                     logprobs: dict | None = None) -> dict:
    """One streamed /v1/completions event. A chunk with usage, no text and no finish_reason is the
    usage-only final chunk of `stream_options.include_usage`, so it has no choices."""
    usage_only = usage is not None and not text and finish_reason is None
    choices = [] if usage_only else [completion_choice(index, text, finish_reason, logprobs)]
    return _envelope(request_id, "text_completion", created, model, choices, usage)


def chat_chunk(request_id: str, model: str, created: int, delta_text: str | None,
               finish_reason: str | None = None, first: bool = False, usage: dict | None = None,
               index: int = 0, logprobs: dict | None = None) -> dict:
    """One streamed chat event; the first of each choice carries the assistant role, as OpenAI's
    does. A chunk with only usage is the final chunk of `stream_options.include_usage`, so it has
    no choices."""
    usage_only = usage is not None and delta_text is None and finish_reason is None and not first
    delta: dict[str, str] = {"role": "assistant"} if first else {}
    if delta_text is not None:
        delta["content"] = delta_text
    choices = [] if usage_only else [{"index": index, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish_reason}]
    return _envelope(request_id, "chat.completion.chunk", created, model, choices, usage)


# ---- logprobs ------------------------------------------------------------------------------------
# A token as the client sees it: (its text, its logprob, the likeliest tokens' (text, logprob)).
TokenInfo = tuple[str, float, list[tuple[str, float]]]
_FLOOR = -9999.0  # OpenAI's stand-in for a logprob too small to show; JSON has no -Infinity


def _lp(v: float) -> float:
    return max(v, _FLOOR)


def completion_logprobs(tokens: list[TokenInfo], first_offset: int) -> dict:
    """Legacy completions logprobs: per token its text, logprob, a {text: logprob} dict of the
    likeliest tokens plus the chosen one (up to logprobs + 1 entries, as OpenAI and vLLM), and its
    character offset in the completion (offsets add up token texts, starting at first_offset)."""
    offsets, at = [], first_offset
    for text, _, _ in tokens:
        offsets.append(at)
        at += len(text)
    tops = []
    for text, lp, top in tokens:
        entry = {t: _lp(v) for t, v in top}
        entry.setdefault(text, _lp(lp))
        tops.append(entry)
    return {"tokens": [t for t, _, _ in tokens], "token_logprobs": [_lp(lp) for _, lp, _ in tokens],
            "top_logprobs": tops, "text_offset": offsets}


def _chat_token(text: str, lp: float) -> dict:
    return {"token": text, "logprob": _lp(lp), "bytes": list(text.encode("utf-8", errors="replace"))}


def chat_logprobs(tokens: list[TokenInfo]) -> dict:
    """Chat logprobs: `content` has, per token, its text, logprob, UTF-8 bytes (of the decoded
    text, as vLLM) and the `top_logprobs` likeliest tokens, highest first."""
    return {"content": [{**_chat_token(text, lp), "top_logprobs": [_chat_token(t, v) for t, v in top]}
                        for text, lp, top in tokens], "refusal": None}


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def models_response(model_ids: list[str], created: int, owned_by: str = "orbitflow") -> dict:
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": owned_by}
                                       for m in model_ids]}
