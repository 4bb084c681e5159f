"""The OpenAI protocol layer: what it accepts, what it rejects and how, and that the official
`openai` client parses what it builds (through its types and through a mocked HTTP round trip)."""

from __future__ import annotations

import json
import math

import httpx2
import openai
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from orbitflow_ray.serving import protocol as p

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMP = {"model": "m", "prompt": "hello"}


def _errors(cls, payload: dict) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as ei:
        cls.model_validate(payload)
    return p.validation_error_message(ei.value)


def _capture_client(responses: list[httpx2.Response], strict: bool = True) -> tuple[openai.OpenAI, list[dict]]:
    """An openai client whose HTTP goes to a mock: records request bodies, replays responses.
    strict validates responses against the client's types (off by default in the real client)."""
    sent: list[dict] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return responses.pop(0)

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    client = openai.OpenAI(base_url="http://test/v1", api_key="k", http_client=http, max_retries=0,
                           _strict_response_validation=strict)
    return client, sent


# ---- accepted payloads --------------------------------------------------------------------------

def test_client_payloads_validate_and_responses_parse():
    chat = p.chat_response("chatcmpl-1", "m", 1, "hello", "stop", 3, 1)
    comp = p.completion_response("cmpl-1", "m", 1, " world", "length", 2, 5)
    client, sent = _capture_client([httpx2.Response(200, json=chat), httpx2.Response(200, json=comp)])
    out = client.chat.completions.create(
        model="m", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_completion_tokens=8, temperature=0.0, stop=["\n"], frequency_penalty=0.0,
        extra_body={"slo": {"tpot_s": 0.05}, "ignore_eos": True, "top_k": 5})
    assert out.choices[0].message.content == "hello" and out.usage.total_tokens == 4
    cout = client.completions.create(model="m", prompt="hello", max_tokens=5, seed=1, presence_penalty=0.0)
    assert cout.choices[0].finish_reason == "length"

    creq = p.ChatCompletionRequest.model_validate(sent[0])
    assert creq.output_limit() == 8 and creq.stop_list() == ["\n"] and creq.top_k == 5
    assert creq.slo.tpot_s == 0.05 and creq.slo.ttft_s is None and creq.ignore_eos
    assert creq.messages_as_dicts() == [{"role": "system", "content": "be brief"},
                                        {"role": "user", "content": "hi"}]
    req = p.CompletionRequest.model_validate(sent[1])
    assert req.prompt_input() == "hello" and req.output_limit() == 5 and req.seed == 1


def test_defaults_and_helpers():
    req = p.CompletionRequest.model_validate(COMP)
    assert (req.temperature, req.top_p, req.top_k, req.seed, req.stream) == (1.0, 1.0, 0, None, False)
    assert req.stop_list() == [] and req.output_limit() is None
    assert p.CompletionRequest.model_validate({**COMP, "stop": "x"}).stop_list() == ["x"]
    assert p.CompletionRequest.model_validate({**COMP, "prompt": [1, 2, 0]}).prompt_input() == [1, 2, 0]
    assert p.CompletionRequest.model_validate({**COMP, "prompt": ["one"]}).prompt_input() == "one"
    # OpenAI's optional fields are nullable; null means the default.
    nulls = p.CompletionRequest.model_validate({**COMP, "n": None, "temperature": None, "stream": None})
    assert (nulls.temperature, nulls.stream) == (1.0, False)
    # vLLM and llama.cpp clients send -1 for "unset"
    unset = p.CompletionRequest.model_validate({**COMP, "seed": -1, "top_k": -1})
    assert (unset.seed, unset.top_k) == (None, 0)


def test_chat_limits_and_content_parts():
    both = p.ChatCompletionRequest.model_validate({**CHAT, "max_tokens": 5, "max_completion_tokens": 9})
    assert both.output_limit() == 9
    assert p.ChatCompletionRequest.model_validate({**CHAT, "max_tokens": 5}).output_limit() == 5
    msgs = [{"role": "developer", "content": "rules"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": []}]
    req = p.ChatCompletionRequest.model_validate({**CHAT, "messages": msgs, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert req.messages_as_dicts() == [{"role": "system", "content": "rules"},
                                       {"role": "user", "content": "ab"},
                                       {"role": "assistant", "content": ""}]
    assert req.stream_options.include_usage


# ---- rejected payloads --------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,fragment", [
    ("max_tokens", "10", "valid integer"),
    ("max_tokens", 0, "greater than or equal to 1"),
    ("max_tokens", -1, "greater than or equal to 1"),
    ("max_tokens", 1.5, "valid integer"),
    ("temperature", "hot", "valid number"),
    ("temperature", 2.5, "less than or equal to 2"),
    ("top_p", 0, "greater than 0"),
    ("stream", "yes", "valid boolean"),
    ("n", 0, "greater than or equal to 1"),
    ("n", 17, "less than or equal to 16"),
    ("best_of", 3, "only best_of == n (1)"),
    ("presence_penalty", 2.5, "less than or equal to 2"),
    ("frequency_penalty", -3, "greater than or equal to -2"),
    ("repetition_penalty", 0, "greater than 0"),
    ("logit_bias", {"abc": 1}, "keys must be token ids"),
    ("logit_bias", {"-5": 1}, "keys must be token ids"),
    ("logit_bias", {"5": 101}, "must be in [-100, 100]"),
    ("min_tokens", -1, "greater than or equal to 0"),
    ("logprobs", 21, "less than or equal to 20"),
    ("logprobs", True, "valid integer"),
    ("top_k", -2, "greater than or equal to 0"),
    ("stream_options", {"include_usage": True}, "only allowed with stream: true"),
    ("stop_token_ids", "7", "valid list"),
    ("stop", ["a", "b", "c", "d", "e"], "at most 4"),
    ("stop", [""], "non-empty"),
    ("seed", True, "valid integer"),
])
def test_rejects_bad_sampling_fields(field, value, fragment):
    msg, param = _errors(p.CompletionRequest, {**COMP, field: value})
    assert param == field and msg.startswith(f"{field}: ") and fragment in msg


@pytest.mark.parametrize("prompt,fragment", [
    ("", "prompt is empty"),
    ([], "prompt is empty"),
    ([""], "prompt is empty"),
    (["a", "b"], "batched prompts are not supported"),
    ([1, -2], "integers >= 0"),
    (123, "valid string"),
])
def test_rejects_bad_prompts(prompt, fragment):
    msg, param = _errors(p.CompletionRequest, {**COMP, "prompt": prompt})
    assert param == "prompt" and fragment in msg and "Value error" not in msg


@pytest.mark.parametrize("field,value,fragment", [("echo", True, "not supported"), ("suffix", "x", "not supported")])
def test_rejects_unsupported_completion_features(field, value, fragment):
    assert _errors(p.CompletionRequest, {**COMP, field: value}) == (f"{field}: {fragment}", field)
    assert p.CompletionRequest.model_validate({**COMP, "echo": False, "logprobs": None}).prompt == "hello"


def test_sampling_fields_parse_into_what_the_engine_takes():
    req = p.CompletionRequest.model_validate({**COMP, "n": 3, "best_of": 3, "logit_bias": {"7": -100, "12": 2.5},
                                              "presence_penalty": 1, "min_tokens": 2, "logprobs": 0})
    assert (req.n, req.best_of, req.presence_penalty, req.min_tokens) == (3, 3, 1, 2)
    assert req.bias_by_token() == {7: -100.0, 12: 2.5} and req.num_logprobs() == 0
    assert p.CompletionRequest.model_validate(COMP).num_logprobs() is None
    chat = p.ChatCompletionRequest.model_validate({**CHAT, "logprobs": True, "top_logprobs": 4})
    assert chat.num_logprobs() == 4
    assert p.ChatCompletionRequest.model_validate({**CHAT, "logprobs": True}).num_logprobs() == 0
    assert p.ChatCompletionRequest.model_validate({**CHAT, "top_logprobs": 0}).num_logprobs() is None
    msg, param = _errors(p.CompletionRequest, {**COMP, "logit_bias": {"5": "x"}})
    assert param == "logit_bias.5" and "valid number" in msg


@pytest.mark.parametrize("slo", [{"tpot_s": 0}, {"tpot_s": -0.1}, {"tpot_s": "fast"}, {"tpot_s": math.inf},
                                 {"tpot_s": math.nan}, {"tpot_s": True}, {"tpot_s": 10**400}])
def test_rejects_bad_slos(slo):
    msg, param = _errors(p.ChatCompletionRequest, {**CHAT, "slo": slo})
    assert param == "slo.tpot_s" and "slo.tpot_s must be a positive number of seconds" in msg
    assert p.SLOSpec(ttft_s=1, tpot_s=0.02).ttft_s == 1


@pytest.mark.parametrize("payload,param,fragment", [
    ({**CHAT, "messages": "hi"}, "messages", "valid list"),
    ({**CHAT, "messages": []}, "messages", "at least 1"),
    ({"messages": CHAT["messages"]}, "model", "Field required"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "Input should be"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.type", "only text content parts are supported"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({**CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs", "less than or equal to 20"),
    ({**CHAT, "logprobs": 1}, "logprobs", "valid boolean"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "response_format", "constrained decoding"),
    ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
])
def test_rejects_bad_chat_payloads(payload, param, fragment):
    msg, got = _errors(p.ChatCompletionRequest, payload)
    assert got == param and fragment in msg


def test_validation_error_message_shapes():
    fastapi_style = [{"type": "int_parsing", "loc": ("body", "max_tokens"),
                      "msg": "Input should be a valid integer", "input": "10"}]
    assert p.validation_error_message(fastapi_style) == ("max_tokens: Input should be a valid integer",
                                                         "max_tokens")
    bad_json = [{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                 "ctx": {"error": "Expecting value"}}]
    assert p.validation_error_message(bad_json) == ("request body is not valid JSON: Expecting value", None)
    with pytest.raises(ValidationError) as ei:
        p.CompletionRequest.model_validate_json("{not json")
    msg, param = p.validation_error_message(ei.value)
    assert msg.startswith("request body is not valid JSON: ") and param is None
    assert p.validation_error_message([{"type": "missing", "loc": ("body",), "msg": "Field required"}]) \
        == ("request body: Field required", None)
    assert p.validation_error_message([]) == ("invalid request", None)
    fastapi_exc = RequestValidationError(fastapi_style)
    assert p.validation_error_message(fastapi_exc)[1] == "max_tokens"


# ---- errors -------------------------------------------------------------------------------------

def test_error_bodies():
    assert p.error_body("bad") == {"error": {"message": "bad", "type": "invalid_request_error",
                                             "param": None, "code": None}}
    cases = [(p.BadRequestError("x"), 400, "invalid_request_error"),
             (p.AuthenticationError("x"), 401, "authentication_error"),
             (p.RateLimitError("x"), 429, "rate_limit_error"),
             (p.ServiceUnavailableError("x"), 503, "server_error"),
             (p.NotFoundError("x"), 404, "not_found_error"),
             (p.APIError("x", status_code=418, type="teapot"), 418, "teapot")]
    for err, status, kind in cases:
        assert isinstance(err, p.APIError) and err.status_code == status and err.body()["error"]["type"] == kind
    assert p.ServiceUnavailableError("busy").body()["error"]["code"] == "service_unavailable"
    nf = p.model_not_found("gpt-9")
    assert nf.status_code == 404 and nf.body()["error"] == {
        "message": "The model 'gpt-9' does not exist", "type": "not_found_error", "param": "model",
        "code": "model_not_found"}


def test_client_raises_typed_errors_from_our_bodies():
    err = p.model_not_found("m")
    client, _ = _capture_client([httpx2.Response(err.status_code, json=err.body())])
    with pytest.raises(openai.NotFoundError) as ei:
        client.completions.create(model="m", prompt="x")
    assert ei.value.code == "model_not_found" and ei.value.param == "model"


# ---- responses ----------------------------------------------------------------------------------

def test_builders_parse_as_openai_types():
    c = Completion.model_validate(p.completion_response("cmpl-1", "m", 7, "hi", "stop", 2, 3))
    assert c.choices[0].text == "hi" and c.usage.total_tokens == 5 and c.created == 7
    cc = ChatCompletion.model_validate(p.chat_response("c-1", "m", 7, "hi", "length", 2, 3))
    assert cc.choices[0].message.role == "assistant" and cc.choices[0].finish_reason == "length"

    first = ChatCompletionChunk.model_validate(p.chat_chunk("c-1", "m", 7, "", first=True))
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    mid = ChatCompletionChunk.model_validate(p.chat_chunk("c-1", "m", 7, "tok"))
    assert mid.choices[0].delta.role is None and mid.usage is None
    last = ChatCompletionChunk.model_validate(p.chat_chunk("c-1", "m", 7, None, finish_reason="stop"))
    assert last.choices[0].delta.content is None and last.choices[0].finish_reason == "stop"
    u = ChatCompletionChunk.model_validate(p.chat_chunk("c-1", "m", 7, None, usage=p.usage(2, 3)))
    assert u.choices == [] and u.usage.total_tokens == 5

    # Completion's choice type requires finish_reason, so only the final chunk validates strictly;
    # mid-stream chunks are checked through the client's streaming path below.
    end = Completion.model_validate(p.completion_chunk("cmpl-1", "m", 7, "x", finish_reason="length"))
    assert end.choices[0].finish_reason == "length" and end.usage is None
    cu = Completion.model_validate(p.completion_chunk("cmpl-1", "m", 7, "", usage=p.usage(1, 1)))
    assert cu.choices == [] and cu.usage.total_tokens == 2

    models = p.models_response(["a", "b"], created=7)
    assert models["object"] == "list" and [Model.model_validate(m).id for m in models["data"]] == ["a", "b"]


def test_streams_parse_through_the_client():
    chat_events = [p.chat_chunk("c", "m", 1, "", first=True), p.chat_chunk("c", "m", 1, "he"),
                   p.chat_chunk("c", "m", 1, "llo"), p.chat_chunk("c", "m", 1, None, finish_reason="stop"),
                   p.chat_chunk("c", "m", 1, None, usage=p.usage(2, 2))]
    comp_events = [p.completion_chunk("d", "m", 1, "a"), p.completion_chunk("d", "m", 1, "b", "length"),
                   p.completion_chunk("d", "m", 1, "", usage=p.usage(1, 2))]

    def stream(events: list[dict]) -> httpx2.Response:
        body = "".join(p.sse(e) for e in events) + p.SSE_DONE
        return httpx2.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    # Not strict: the client's Completion type requires finish_reason, which mid-stream chunks lack
    # (OpenAI sends null there too); the real client only constructs, it does not validate.
    client, _ = _capture_client([stream(chat_events), stream(comp_events)], strict=False)
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
    assert chunks[-1].usage.completion_tokens == 2
    cchunks = list(client.completions.create(model="m", prompt="x", stream=True))
    assert [c.choices[0].text for c in cchunks if c.choices] == ["a", "b"]
    assert cchunks[1].choices[0].finish_reason == "length" and cchunks[-1].usage.total_tokens == 3


def test_sse_and_finish_reasons():
    assert p.sse({"a": 1, "b": [1, 2]}) == 'data: {"a":1,"b":[1,2]}\n\n'
    assert p.sse("[DONE]") == p.SSE_DONE == "data: [DONE]\n\n"
    assert [p.finish_reason_openai(r) for r in ("stop", "length", "abort", None)] == ["stop", "length",
                                                                                     "stop", None]


# ---- property -----------------------------------------------------------------------------------

_leaf = (st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -(10**400)]) | st.floats()
         | st.text(max_size=5))
_json = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=10)
_keys = st.sampled_from(sorted(p.CompletionRequest.model_fields) + ["frequency_penalty", "x"])
_slo = st.fixed_dictionaries({}, optional={"ttft_s": _json, "tpot_s": _json, "x": _json})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _json, max_size=8), st.booleans(), st.none() | _slo)
def test_any_completion_payload_validates_or_raises_validation_error(payload, base, slo):
    """Anything else escaping validation would be a 500 instead of a 400."""
    if base:
        payload = {**COMP, **payload}
    if slo is not None:
        payload["slo"] = slo
    try:
        p.CompletionRequest.model_validate(payload)
    except ValidationError as exc:
        msg, param = p.validation_error_message(exc)
        assert isinstance(msg, str) and msg and (param is None or isinstance(param, str))
