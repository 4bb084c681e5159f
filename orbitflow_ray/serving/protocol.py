"""The OpenAI wire protocol: request models, error bodies and response builders.

Requests validate every field strictly, so `"max_tokens": "10"` is a 400, not a silent coercion.
Fields OpenAI or vLLM define that we do not implement are refused by name unless set to a value that
asks for nothing (`unsupported.py`); any other unknown field is a 400 naming it. Responses are
plain dicts in OpenAI's exact shapes so the official `openai` client parses them unchanged.
Nothing here imports Ray or the engine: the HTTP layer, the router and the tests share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      StrictStr, ValidationInfo, field_validator, model_validator)

from orbitflow_ray.serving import unsupported
from orbitflow_ray.serving.unsupported import Refused

_MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16  # choices per request: each is a whole engine request (the prompt's KV is not shared)
MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs (and vLLM's default max_logprobs)


def _unicode_text(v: str) -> str:
    """JSON may carry a lone UTF-16 surrogate (`"\\ud800"`); Python keeps it in the str, but it is
    not Unicode text: tokenizers raise on it and it cannot be encoded as UTF-8. NUL, bidi marks and
    combining characters are valid text and pass."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone UTF-16 surrogate (U+{ord(v[e.start]):04X} at character "
                         f"{e.start}), which is not valid Unicode text") from None
    return v


Text = Annotated[StrictStr, AfterValidator(_unicode_text)]  # a string that is valid Unicode text


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    _refused: ClassVar[dict[str, Refused]] = {}  # fields we do not implement (see unsupported.py)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's schema makes its optional fields nullable and some clients send `"n": null`.
        if not isinstance(data, dict):
            return data
        data = unsupported.strip_neutral(data, cls._refused)
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if not (v is None and k in fields and not fields[k].is_required())}


SLO_MAX_S = {"ttft_s": 3600.0, "tpot_s": 60.0}


class SLOSpec(_Request):
    """Per-request latency targets (an OrbitFlow extension); None means the server's default."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @field_validator("ttft_s", "tpot_s", mode="before")
    @classmethod
    def _positive_seconds(cls, v: Any, info: ValidationInfo) -> Any:
        # One check before pydantic's own, so "fast", True, 0, inf and 10**400 get one clear message.
        if v is None:
            return v
        try:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < float(v) < math.inf
        except OverflowError:
            ok = False
        if not ok:
            raise ValueError(f"slo.{info.field_name} must be a positive number of seconds")
        # Streams are paced at the TPOT SLO: a huge one would hold a connection open for years.
        most = SLO_MAX_S[info.field_name]
        if float(v) > most:
            raise ValueError(f"slo.{info.field_name} must be at most {most:g} seconds")
        return v


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1, description=(
        "Most tokens to generate. Omitted: 16 for /v1/completions (OpenAI's default), the context left "
        "(max_model_len - prompt tokens, as vLLM) for chat; either capped at max_output_tokens, then "
        "lowered by the worker to the most its KV tiers can hold for this request under the policy's "
        "placement for it, so an omitted max_tokens never makes a request too big to run."))
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: StrictInt = Field(0, ge=0)  # extension (vLLM's); 0 disables top-k, and so does -1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None  # extension (vLLM's)
    seed: StrictInt | None = None  # -1 means unset, as vLLM and llama.cpp clients send it
    ignore_eos: StrictBool = False  # extension: benchmarks need exact output lengths
    slo: SLOSpec | None = None  # extension
    user: StrictStr | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    best_of: StrictInt | None = None  # only == n (no server-side ranking of extra candidates)
    presence_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: StrictFloat = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: StrictFloat = Field(1.0, gt=0.0, allow_inf_nan=False)  # extension (vLLM's)
    logit_bias: dict[StrictStr, StrictFloat] | None = None  # token id (as a string, as JSON keys are) -> bias
    min_tokens: StrictInt = Field(0, ge=0)  # extension (vLLM's)

    _refused = unsupported.SAMPLING

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v != n:
            raise ValueError(f"best_of={v} is not supported: only best_of == n ({n}); this server does not "
                             "generate and rank extra candidates")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias of token {key} must be in [-100, 100], got {bias}")
        return v

    def bias_by_token(self) -> dict[int, float]:
        return {int(k): float(b) for k, b in (self.logit_bias or {}).items()}

    @field_validator("seed", "top_k", mode="before")
    @classmethod
    def _minus_one_is_unset(cls, v: Any, info: ValidationInfo) -> Any:
        if v == -1 and type(v) is int:
            return None if info.field_name == "seed" else 0
        return v

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and info.data.get("stream") is False:
            raise ValueError("stream_options is only allowed with stream: true")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > _MAX_STOP:
            raise ValueError(f"at most {_MAX_STOP} stop sequences are supported")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_SamplingFields):
    _refused = unsupported.COMPLETION
    prompt: Text | list[StrictInt] | list[Text]
    # The chosen token's logprob and those of the `logprobs` likeliest tokens, per output token.
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def num_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        # Shape errors get a sentence here; element types are left to the typed union after us.
        if v == "" or v == []:
            raise ValueError("prompt is empty")
        if isinstance(v, list) and all(isinstance(p, str) for p in v):
            if len(v) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
            if v[0] == "":
                raise ValueError("prompt is empty")
        if isinstance(v, list) and any(isinstance(t, int) and not isinstance(t, bool) and t < 0 for t in v):
            raise ValueError("prompt token ids must be integers >= 0")
        return v

    def prompt_input(self) -> str | list[int]:
        p = self.prompt
        return p[0] if isinstance(p, list) and isinstance(p[0], str) else p  # type: ignore[return-value]

    def output_limit(self) -> int | None:
        return self.max_tokens


class ContentPart(_Request):
    type: Literal["text"]
    text: Text

    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if v != "text":
            raise ValueError("only text content parts are supported")
        return v


class ChatMessage(_Request):
    _refused = unsupported.MESSAGE
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    _refused = unsupported.CHAT
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def output_limit(self) -> int | None:
        """max_completion_tokens is OpenAI's newer name and wins when both are sent."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def messages_as_dicts(self) -> list[dict[str, str]]:
        """The input of `tokenizer.apply_chat_template`. "developer" is OpenAI's new name for
        "system", which HF chat templates do not know, so it is sent as "system"."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


# ---- errors -------------------------------------------------------------------------------------

def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error with its HTTP status and OpenAI error body; the HTTP layer turns it into a response."""

    status_code: int = 500
    type: str = "server_error"
    code: str | int | None = None

    def __init__(self, message: str, *, status_code: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | int | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # sent as Retry-After (429/503: come back later)
        self.message = message
        self.status_code = status_code if status_code is not None else self.status_code
        self.type = type if type is not None else self.type
        self.param = param
        self.code = code if code is not None else self.code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None


class BadRequestError(APIError):
    status_code, type = 400, "invalid_request_error"


class AuthenticationError(APIError):
    status_code, type = 401, "authentication_error"


class NotFoundError(APIError):
    status_code, type = 404, "not_found_error"


class RateLimitError(APIError):
    status_code, type = 429, "rate_limit_error"


class ServiceUnavailableError(APIError):
    status_code, type, code = 503, "server_error", "service_unavailable"


def model_not_found(model: str) -> NotFoundError:
    return NotFoundError(f"The model '{model}' does not exist", param="model", code="model_not_found")


# Union members show up in pydantic locations as tags ("str", "list[int]"); they are not fields.
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _is_field(part: Any) -> bool:
    return isinstance(part, int) or (isinstance(part, str) and part not in _UNION_TAGS
                                     and "[" not in part and "-" not in part)


def validation_error_message(exc: Any) -> tuple[str, str | None]:
    """(message, param) for one error of a pydantic/FastAPI validation failure.

    Accepts a ValidationError, a RequestValidationError, or their `.errors()` list. A union reports
    one error per member; the deepest one got furthest and is the most telling, so it is chosen.
    Never raises: it runs in the error handler, where a second exception would turn a 400 into a 500.
    """
    try:
        errors: Sequence[Any] = exc.errors() if hasattr(exc, "errors") else exc
        err = max(errors, key=lambda e: len(e.get("loc") or ()))  # max keeps the first of equals
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error") or err.get("msg", "")
            return f"request body is not valid JSON: {detail}", None
        loc = list(err.get("loc") or ())
        if loc and loc[0] == "body":
            loc = loc[1:]
        named = (err.get("ctx") or {}).get("param")  # a model-level error about one field
        param = ".".join(str(p) for p in loc + ([named] if named else []) if _is_field(p)) or None
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (the README's Serving section lists the supported ones)"
        return f"{param or 'request body'}: {msg}", param
    except Exception:  # noqa: BLE001 - see docstring
        return "invalid request", None


# The response builders live in responses.py; protocol is where the HTTP layer and tests find them.
from orbitflow_ray.serving.responses import (SSE_DONE, chat_choice, chat_chunk, chat_logprobs,  # noqa: E402,F401
                                             chat_response, chat_response_of, completion_choice,
                                             completion_chunk, completion_logprobs, completion_response,
                                             completion_response_of, finish_reason_openai, models_response,
                                             sse, usage)
