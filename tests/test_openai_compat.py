"""The OpenAI API as real clients use it (issue 17): odd unicode is never a 5xx, tokenizing stays off
the event loop, body and prompt sizes are bounded, vLLM/llama.cpp "unset" values, CORS, HEAD and
model routes, and every field either honoured or refused by name.

The app runs in-process (ASGI) over a fake, instant engine: tokenizing and validation are real
(SmolLM2's tokenizer and chat template), generation is not. Where output matters, a real engine.

Run: .venv/bin/python -m pytest -q tests/test_openai_compat.py
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orbitflow_ray.serving.api import build_api
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.serving.messages import GenerateRequest, StreamDelta
from orbitflow_ray.serving.openai_service import OpenAIService

MODEL = "smollm2-135m"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


class FakeEngine:
    """Accepts every request at once and answers one token; remembers what it was given."""

    def __init__(self) -> None:
        self.seen: list[GenerateRequest] = []

    async def generate(self, req: GenerateRequest):
        self.seen.append(req)
        n = req.num_prompt_tokens
        yield StreamDelta("", [], prompt_tokens=n)
        yield StreamDelta("ok", [1], True, "length", n, 1)


@pytest.fixture(scope="module")
def service() -> OpenAIService:
    """One service (the tokenizer loads once); each test builds its own app and engine on it."""
    return OpenAIService(AppArgs(max_output_tokens=4), FakeEngine().generate)


def _call(app, method: str, url: str, **kw) -> httpx.Response:
    if "json" in kw:  # ASCII JSON, as json.dumps writes it: a lone surrogate travels as "\\ud800"
        kw["content"] = json.dumps(kw.pop("json")).encode()
        kw["headers"] = {"content-type": "application/json", **kw.get("headers", {})}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.request(method, url, **kw)
    return asyncio.run(go())


def _app(service: OpenAIService, **args):
    """The app over `service` with a fresh fake engine (and other AppArgs, if given)."""
    fake = FakeEngine()
    svc = service if not args else OpenAIService(AppArgs(max_output_tokens=4, **args), fake.generate)
    svc.generate = fake.generate
    app = build_api(svc)
    app.state.fake = fake
    return app


def _body(route: str, text: str, **kw) -> dict:
    where = {"prompt": text} if route == COMPLETIONS else {"messages": [{"role": "user", "content": text}]}
    return {"model": MODEL, "max_tokens": 2, **where, **kw}


def _check_answer(r: httpx.Response, stream: bool) -> None:
    """200 with a whole answer (a stream ends with [DONE], no error event)."""
    assert r.status_code == 200, r.text
    if stream:
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), r.text
    else:
        assert r.json()["choices"][0]["finish_reason"] == "length"


def _check_error(r: httpx.Response, status: int, param: str | None, fragment: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert sorted(err) == ["code", "message", "param", "type"] and err["param"] == param, err
    assert fragment in err["message"], err
    return err


# ---- 1. never a 5xx for client input -------------------------------------------------------------

VALID_ODD = ["hi \x00 there", "\u200f\u202eabc\u202c", "e\u0301\u0308 a\u0327", "\U0001f600 \ufeff \u2028"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_lone_surrogates_are_400s_naming_the_field(service, route, stream):
    app = _app(service)
    where = "prompt" if route == COMPLETIONS else "messages.0.content"
    r = _call(app, "POST", route, json=_body(route, "hi \ud800 there", stream=stream))
    _check_error(r, 400, where, "lone UTF-16 surrogate (U+D800")
    r = _call(app, "POST", route, json=_body(route, "ok", stream=stream, stop=["\udfff"]))
    _check_error(r, 400, "stop.0", "surrogate")
    if route == CHAT:
        parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "\udc00b"}]
        r = _call(app, "POST", route, json={**_body(route, ""), "messages": [{"role": "user", "content": parts}]})
        _check_error(r, 400, "messages.0.content.1.text", "surrogate")
    r = _call(app, "POST", route, json={**_body(route, "ok"), "model": "\ud800x"})
    _check_error(r, 404, "model")  # the message quotes the name: still a clean body
    assert not app.state.fake.seen


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_nul_bidi_and_combining_characters_are_served(service, route, stream):
    app = _app(service)
    for text in VALID_ODD:
        _check_answer(_call(app, "POST", route, json=_body(route, text, stream=stream, stop=[text[:2]])), stream)
    assert len(app.state.fake.seen) == len(VALID_ODD)
    assert all(req.num_prompt_tokens > 0 for req in app.state.fake.seen)


_any_char = st.characters(codec=None, categories=("L", "M", "N", "P", "S", "Z", "C"))  # surrogates too


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(text=st.text(_any_char, min_size=1, max_size=12), route=st.sampled_from([COMPLETIONS, CHAT]),
       stream=st.booleans(), field=st.sampled_from(["text", "stop"]))
def test_fuzzed_unicode_is_served_or_refused_by_name(service, text, route, stream, field):
    app = _app(service)
    body = _body(route, text if field == "text" else "hello", stream=stream,
                 **({"stop": text} if field == "stop" else {}))
    r = _call(app, "POST", route, json=body)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        _check_answer(r, stream)
    else:
        err = r.json()["error"]
        assert err["param"] in ("prompt", "messages", "messages.0.content", "stop"), err
        # 400 only for a lone surrogate, or text the tokenizer turns into no tokens at all
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text) or "empty" in err["message"], (text, err)


# ---- 2. tokenizing off the event loop, body and prompt limits -----------------------------------

def test_tokenizing_and_chat_templating_run_off_the_event_loop(service, monkeypatch):
    import threading
    threads: list[str] = []
    tok = service.tokenizer
    for name in ("encode", "apply_chat_template"):
        real = getattr(tok, name)

        def spy(*a, _real=real, **kw):
            threads.append(threading.current_thread().name)
            return _real(*a, **kw)
        monkeypatch.setattr(tok, name, spy)
    app = _app(service)
    for route in (COMPLETIONS, CHAT):
        _check_answer(_call(app, "POST", route, json=_body(route, "Hello there")), False)
    assert len(threads) == 2 and all(t.startswith("orbitflow-tokenize") for t in threads), threads


def test_body_over_the_limit_is_413(service):
    app = _app(service, max_request_body_bytes=2000)
    big = _body(COMPLETIONS, "word " * 500)
    err = _check_error(_call(app, "POST", COMPLETIONS, json=big), 413, None, "limit of 2000 bytes")
    assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"

    async def chunks():  # no Content-Length: counted while read
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 256):
            yield payload[i:i + 256]
    _check_error(_call(app, "POST", CHAT, content=chunks(), headers={"content-type": "application/json"}),
                 413, None, "limit of 2000 bytes")
    _check_answer(_call(app, "POST", COMPLETIONS, json=_body(COMPLETIONS, "word " * 50)), False)
    assert len(app.state.fake.seen) == 1


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_huge_prompt_is_refused_before_tokenizing(service, route, monkeypatch):
    calls = []
    monkeypatch.setattr(service.tokenizer, "encode", lambda *a, **kw: calls.append(1) or [1])
    monkeypatch.setattr(service.tokenizer, "apply_chat_template", lambda *a, **kw: calls.append(1) or [1])
    app = _app(service)
    chars = service.max_token_chars * (service.max_model_len - 1) + 1
    where = "prompt" if route == COMPLETIONS else "messages"
    err = _check_error(_call(app, "POST", route, json=_body(route, "x" * chars)), 400, where,
                       f"has {chars} characters")
    assert err["code"] == "context_length_exceeded" and not calls and not app.state.fake.seen
    small = _app(service, max_prompt_tokens=10)  # max_prompt_tokens lowers the bound
    limit_chars = 10 * service.max_token_chars
    err = _check_error(_call(small, "POST", route, json=_body(route, "x" * (limit_chars + 1))), 400, where,
                       "more than 10 tokens")
    assert err["code"] == "prompt_too_long"


# ---- 3. -1 means unset ----------------------------------------------------------------------------

@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_seed_and_top_k_minus_one_mean_unset(service, route):
    app = _app(service)
    _check_answer(_call(app, "POST", route, json=_body(route, "hi", seed=-1, top_k=-1)), False)
    params = app.state.fake.seen[0].params
    assert (params.seed, params.top_k) == (None, 0)
    _check_error(_call(app, "POST", route, json=_body(route, "hi", seed=-2)), 400, "seed", "-1: unset")
    _check_error(_call(app, "POST", route, json=_body(route, "hi", top_k=-2)), 400, "top_k")


# ---- 4. CORS, HEAD /health, GET /v1/models/{model} -------------------------------------------------

PREFLIGHT = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.mark.parametrize("key", [None, "sk-test-0123456789"])
def test_browser_preflight_is_answered_without_the_key(service, key):
    app = _app(service, api_key=key) if key else _app(service)
    r = _call(app, "OPTIONS", CHAT, headers=PREFLIGHT)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].lower().split(",")}
    assert allowed >= {"authorization", "content-type"}, allowed
    # the request that follows carries the CORS header on its answer, error or not
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    r = _call(app, "POST", CHAT, json=_body(CHAT, "hi"), headers={"Origin": PREFLIGHT["Origin"], **auth})
    _check_answer(r, False)
    assert r.headers["access-control-allow-origin"] == "*"
    if key:  # the preflight is open, the request itself is not
        r = _call(app, "POST", CHAT, json=_body(CHAT, "hi"), headers={"Origin": PREFLIGHT["Origin"]})
        _check_error(r, 401, None)


def test_allowed_origins_are_configurable(service):
    app = _app(service, allowed_origins=["https://app.example"])
    ok = _call(app, "OPTIONS", CHAT, headers={**PREFLIGHT, "Origin": "https://app.example"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    other = _call(app, "OPTIONS", CHAT, headers=PREFLIGHT)
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_head_health_and_model_by_id(service):
    app = _app(service)
    head = _call(app, "HEAD", "/health")
    assert head.status_code == 200 and head.content == b""
    r = _call(app, "GET", f"/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json() == _call(app, "GET", "/v1/models").json()["data"][0]
    assert r.json()["id"] == MODEL and r.json()["object"] == "model"
    err = _check_error(_call(app, "GET", "/v1/models/gpt-9"), 404, "model", "gpt-9")
    assert err["code"] == "model_not_found"
    _check_error(_call(app, "GET", "/v1/models/org/some-model"), 404, "model", "org/some-model")


# ---- 5. stream_options without a stream; lowercase bearer ------------------------------------------

@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
def test_stream_options_without_stream_is_400(service, route):
    app = _app(service)
    body = _body(route, "hi", stream_options={"include_usage": True})
    _check_error(_call(app, "POST", route, json=body), 400, "stream_options", "stream: true")
    _check_error(_call(app, "POST", route, json={**body, "stream": False}), 400, "stream_options")
    _check_answer(_call(app, "POST", route, json={**body, "stream": True}), True)


def test_bearer_scheme_is_case_insensitive(service):
    key = "sk-test-0123456789"
    app = _app(service, api_key=key)
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = _call(app, "GET", "/v1/models", headers={"Authorization": f"{scheme} {key}"})
        assert r.status_code == 200, (scheme, r.text)
    for header in (f"Basic {key}", key, f"bearer {key}x", "bearer", ""):
        _check_error(_call(app, "GET", "/v1/models", headers={"Authorization": header}), 401, None)
    assert _call(app, "GET", "/health").status_code == 200


# ---- 6. every field honoured or refused by name ---------------------------------------------------

# (route, field, a value asking for the feature, a neutral value that is accepted). The sampling
# fields (penalties, logit_bias, min_tokens, logprobs, n) are honoured: tests/test_openai_sampling.py.
REFUSED = [
    (r, "best_of", 2, 1) for r in (COMPLETIONS, CHAT)
] + [
    (COMPLETIONS, "echo", True, False), (COMPLETIONS, "suffix", "x", ""),
    (CHAT, "response_format", {"type": "json_object"}, {"type": "text"}),
    (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}], []), (CHAT, "tool_choice", "auto", "none"),
]


@pytest.mark.parametrize("route,field,on,off", REFUSED)
def test_unimplemented_fields_are_refused_by_name_unless_neutral(service, route, field, on, off):
    app = _app(service)
    _check_error(_call(app, "POST", route, json=_body(route, "hi", **{field: on})), 400, field, "supported")
    _check_answer(_call(app, "POST", route, json=_body(route, "hi", **{field: off})), False)
    assert len(app.state.fake.seen) == 1


def test_tool_calls_in_chat_history_are_refused_by_name(service):
    app = _app(service)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    r = _call(app, "POST", CHAT, json={**_body(CHAT, ""), "messages": msgs})
    _check_error(r, 400, "messages.1.tool_calls", "tool calls")
    # an assistant reply sent back as the openai client dumps it: nulls and empty lists are fine
    msgs[1] = {"role": "assistant", "content": "hello", "tool_calls": [], "refusal": None, "audio": None,
               "function_call": None, "annotations": []}
    _check_answer(_call(app, "POST", CHAT, json={**_body(CHAT, ""), "messages": msgs + [msgs[0]]}), False)


@pytest.mark.parametrize("route,where,payload", [
    (COMPLETIONS, "frobnicate", {"frobnicate": 1}),
    (CHAT, "messages.0.weight", {"messages": [{"role": "user", "content": "hi", "weight": 2}]}),
    (CHAT, "slo.tbt_s", {"slo": {"tbt_s": 0.1}}),
    (CHAT, "stream_options.include_obfuscation", {"stream": True, "stream_options": {"include_obfuscation": True}}),
])
def test_unknown_fields_are_400s_naming_them(service, route, where, payload):
    app = _app(service)
    _check_error(_call(app, "POST", route, json={**_body(route, "hi"), **payload}), 400, where, "unknown field")


def test_the_openai_client_s_normal_calls_pass(service):
    import openai

    async def run():
        app = _app(service)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="k", http_client=http, max_retries=0)
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        chat = await client.chat.completions.create(
            model=MODEL, messages=msgs, max_completion_tokens=3, temperature=0.7, top_p=0.9, seed=1, stop=["\n"],
            user="u1", n=1, presence_penalty=0, frequency_penalty=0, logprobs=False, response_format={"type": "text"},
            extra_body={"top_k": 5, "ignore_eos": True, "slo": {"tpot_s": 0.1}, "stop_token_ids": [2]})
        msgs.append(chat.choices[0].message.model_dump())  # the reply sent back, as apps do
        msgs.append({"role": "user", "content": "more"})
        parts = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=3, stream=True, stream_options={"include_usage": True})]
        comp = await client.completions.create(model=MODEL, prompt="hi", max_tokens=3, echo=False, best_of=1,
                                               logprobs=None, suffix=None)
        model = await client.models.retrieve(MODEL)
        return chat, parts, comp, model, app.state.fake.seen

    chat, parts, comp, model, seen = asyncio.run(run())
    assert chat.choices[0].message.content == "ok" and parts[-1].usage.completion_tokens == 1
    assert comp.choices[0].text == "ok" and model.id == MODEL
    first = seen[0].params
    assert (first.max_tokens, first.top_k, first.seed, first.stop, first.stop_token_ids, first.ignore_eos) \
        == (3, 5, 1, ["\n"], [2], True)
    assert len(seen) == 3


def test_slos_reach_the_engine_with_the_server_defaults_filled_in(service):
    """The TTFT and TPOT SLOs travel in the request's SamplingParams (the engine's admission reads
    them there), the server's defaults where the client set none; the ingress stamps its arrival."""
    app = _app(service, default_ttft_slo_s=7.0)
    before = time.time()
    for extra in ({"slo": {"ttft_s": 2.5, "tpot_s": 0.2}}, {}):
        assert _call(app, "POST", COMPLETIONS, json=_body(COMPLETIONS, "hi", **extra)).status_code == 200
    given, default = app.state.fake.seen
    assert (given.params.ttft_slo_s, given.params.slo_s) == (2.5, 0.2)
    assert (default.params.ttft_slo_s, default.params.slo_s) == (7.0, None)  # None: the engine's tpot_slo_s
    assert before <= given.arrival_unix <= default.arrival_unix <= time.time()


@pytest.mark.slow
def test_stop_token_ids_over_http_match_the_offline_engine():
    from orbitflow_ray.llm import LLM
    from orbitflow_ray.sampling_params import SamplingParams
    from orbitflow_ray.serving.engine_loop import AsyncEngine

    kv = {"kv_policy": "no-offload", "device_kv_bytes": 32 << 20, "host_kv_bytes": 1 << 20}
    llm = LLM(MODEL, **kv)
    free = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    stop_id = free.token_ids[3]
    want = llm.generate(["The capital of France is"],
                        SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=[stop_id]))[0]
    assert want.finish_reason == "stop" and len(want.token_ids) < len(free.token_ids)

    async def run():
        ae = AsyncEngine(llm.engine).start()
        try:
            app = build_api(OpenAIService(AppArgs(engine=kv), ae.stream))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
                body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
                        "ignore_eos": True, "stop_token_ids": [stop_id]}
                return (await c.post(COMPLETIONS, json=body)).json()
        finally:
            ae.shutdown()
    got = asyncio.run(run())
    assert got["choices"][0]["text"] == want.text and got["choices"][0]["finish_reason"] == "stop"
    assert got["usage"]["completion_tokens"] == len(want.token_ids)
