"""Issue 17's sampling fields over HTTP: penalties, logit_bias, min_tokens, logprobs / top_logprobs
and n > 1 reach the engine and come back in OpenAI's shapes, streamed and not.

The first half runs the app over a scripted engine (instant; tokenizer and validation real); the
second over the real SmolLM2 engine, with the `openai` client where the issue asks for it.

Run: .venv/bin/python -m pytest -q tests/test_openai_sampling.py
"""

from __future__ import annotations

import asyncio
import json

import httpx2 as httpx
import pytest

from orbitflow_ray.outputs import TokenLogprobs
from orbitflow_ray.serving.api import build_api
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.serving.messages import GenerateRequest, StreamDelta
from orbitflow_ray.serving.openai_service import OpenAIService

MODEL = "smollm2-135m"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ROUTES = [COMPLETIONS, CHAT]


class ScriptedEngine:
    """Answers every request with the tokens of " Paris is" one delta each, with logprobs when
    asked (chosen token -0.25, a runner-up `ALT` at -1.5); remembers the requests."""

    def __init__(self, tokenizer) -> None:
        self.ids = tokenizer.encode(" Paris is", add_special_tokens=False)
        self.alt = tokenizer.encode(" London", add_special_tokens=False)[0]
        self.pieces = [tokenizer.decode([t]) for t in self.ids]
        self.seen: list[GenerateRequest] = []

    async def generate(self, req: GenerateRequest):
        self.seen.append(req)
        n, k = req.num_prompt_tokens, req.params.logprobs
        yield StreamDelta("", [], prompt_tokens=n)
        for i, (tok, text) in enumerate(zip(self.ids, self.pieces)):
            last = i == len(self.ids) - 1
            lps = None if k is None else [TokenLogprobs(tok, -0.25, ((tok, -0.25), (self.alt, -1.5))[:k])]
            yield StreamDelta(text, [tok], last, "length" if last else None, n, i + 1, lps)


@pytest.fixture(scope="module")
def service() -> OpenAIService:
    return OpenAIService(AppArgs(max_output_tokens=8), lambda req: None)


@pytest.fixture()
def app(service):
    engine = ScriptedEngine(service.tokenizer)
    service.generate = engine.generate
    api = build_api(service)
    api.state.engine = engine
    return api


def _post(app, route: str, body: dict) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            return await c.post(route, json=body)
    return asyncio.run(go())


def _body(route: str, **kw) -> dict:
    where = {"prompt": "The capital of France is"} if route == COMPLETIONS else {
        "messages": [{"role": "user", "content": "The capital of France?"}]}
    return {"model": MODEL, "max_tokens": 4, **where, **kw}


def _events(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _error(r: httpx.Response, param: str, fragment: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


# ---- fields reach the engine ------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ROUTES)
def test_penalties_bias_and_min_tokens_reach_the_engine(app, route, stream):
    body = _body(route, stream=stream, presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.3,
                 logit_bias={"42": -100, "7": 2.5}, min_tokens=3)
    assert _post(app, route, body).status_code == 200
    sp = app.state.engine.seen[0].params
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.min_tokens) == (0.5, -1, 1.3, 3)
    assert sp.logit_bias == {42: -100.0, 7: 2.5} and sp.logprobs is None


@pytest.mark.parametrize("route", ROUTES)
def test_bad_sampling_values_are_400s_naming_the_field(app, route):
    _error(_post(app, route, _body(route, logit_bias={"49152": 1})), "logit_bias", "must be < 49152")
    _error(_post(app, route, _body(route, min_tokens=5)), "min_tokens", "more than max_tokens=4")
    _error(_post(app, route, _body(route, best_of=3, n=2)), "best_of", "only best_of == n (2)")
    _error(_post(app, route, _body(route, frequency_penalty=2.01)), "frequency_penalty", "less than or equal")
    _error(_post(app, route, _body(route, n=17)), "n", "less than or equal to 16")
    if route == CHAT:
        _error(_post(app, route, _body(route, top_logprobs=2)), "top_logprobs", "needs logprobs: true")
    else:
        _error(_post(app, route, _body(route, logprobs=21)), "logprobs", "less than or equal to 20")
    assert not app.state.engine.seen


# ---- logprobs shapes --------------------------------------------------------------------------------

def test_completion_logprobs_shape_streamed_and_not(app):
    eng = app.state.engine
    whole = _post(app, COMPLETIONS, _body(COMPLETIONS, logprobs=1)).json()["choices"][0]
    lp = whole["logprobs"]
    assert lp["tokens"] == eng.pieces and lp["token_logprobs"] == [-0.25] * len(eng.pieces)
    assert lp["top_logprobs"] == [{piece: -0.25} for piece in eng.pieces]  # the chosen token is the top one
    assert lp["text_offset"] == [sum(len(p) for p in eng.pieces[:i]) for i in range(len(eng.pieces))]
    assert eng.seen[-1].params.logprobs == 1
    chunks = [e["choices"][0] for e in _events(_post(app, COMPLETIONS, _body(COMPLETIONS, logprobs=1, stream=True)))]
    assert [c["logprobs"]["tokens"][0] for c in chunks] == eng.pieces
    assert [c["logprobs"]["text_offset"][0] for c in chunks] == lp["text_offset"]
    # logprobs=0: the chosen token's logprob only; top_logprobs holds just it (OpenAI: up to logprobs + 1)
    zero = _post(app, COMPLETIONS, _body(COMPLETIONS, logprobs=0)).json()["choices"][0]["logprobs"]
    assert zero["top_logprobs"] == [{piece: -0.25} for piece in eng.pieces]
    assert _post(app, COMPLETIONS, _body(COMPLETIONS)).json()["choices"][0]["logprobs"] is None


def test_chat_logprobs_shape_streamed_and_not(app, service):
    eng = app.state.engine
    alt = service.tokenizer.decode([eng.alt])
    whole = _post(app, CHAT, _body(CHAT, logprobs=True, top_logprobs=2)).json()["choices"][0]
    content = whole["logprobs"]["content"]
    assert [c["token"] for c in content] == eng.pieces and whole["message"]["content"] == "".join(eng.pieces)
    first = content[0]
    assert first["logprob"] == -0.25 and first["bytes"] == list(eng.pieces[0].encode())
    assert first["top_logprobs"] == [{"token": eng.pieces[0], "logprob": -0.25, "bytes": list(eng.pieces[0].encode())},
                                     {"token": alt, "logprob": -1.5, "bytes": list(alt.encode())}]
    events = _events(_post(app, CHAT, _body(CHAT, logprobs=True, top_logprobs=2, stream=True)))
    streamed = [c for e in events for c in (e["choices"][0]["logprobs"] or {"content": []})["content"]]
    assert streamed == content
    plain = _post(app, CHAT, _body(CHAT, logprobs=True)).json()["choices"][0]["logprobs"]["content"]
    assert [c["top_logprobs"] for c in plain] == [[]] * len(eng.pieces) and eng.seen[-1].params.logprobs == 0


# ---- n > 1 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
def test_n_fans_out_with_derived_seeds_and_indexed_choices(app, route):
    eng = app.state.engine
    r = _post(app, route, _body(route, n=3, seed=41, temperature=0.8)).json()
    base = r["id"]
    assert [q.request_id for q in eng.seen] == [f"{base}-{i}" for i in range(3)]
    assert [q.params.seed for q in eng.seen] == [41, 42, 43]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert r["usage"]["completion_tokens"] == 3 * len(eng.ids)
    assert r["usage"]["prompt_tokens"] == eng.seen[0].num_prompt_tokens
    eng.seen.clear()
    _post(app, route, _body(route, n=2, temperature=0.8))
    assert [q.params.seed for q in eng.seen] == [None, None]


@pytest.mark.parametrize("route", ROUTES)
def test_n_streams_every_choice_to_its_end(app, route):
    eng = app.state.engine
    events = _events(_post(app, route, _body(route, n=2, stream=True, stream_options={"include_usage": True})))
    key = "text" if route == COMPLETIONS else "delta"
    by_index: dict[int, list] = {0: [], 1: []}
    for e in events[:-1]:
        (c,) = e["choices"]
        by_index[c["index"]].append(c)
    for chunks in by_index.values():
        texts = [c[key] if route == COMPLETIONS else c[key].get("content", "") for c in chunks]
        assert "".join(texts) == "".join(eng.pieces) and chunks[-1]["finish_reason"] == "length"
        if route == CHAT:
            assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2 * len(eng.ids)


# ---- the real engine (SmolLM2) ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_app():
    from orbitflow_ray.llm import LLM
    from orbitflow_ray.serving.engine_loop import AsyncEngine

    kv = {"kv_policy": "no-offload", "device_kv_bytes": 32 << 20, "host_kv_bytes": 1 << 20}
    llm = LLM(MODEL, **kv)
    engine = AsyncEngine(llm.engine).start()
    app = build_api(OpenAIService(AppArgs(engine=kv), engine.stream))
    app.state.llm = llm
    yield app
    engine.shutdown()


def _client_run(app, fn):
    """Run `await fn(client)` with the openai client talking to app in-process."""
    import openai

    async def go():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")
        client = openai.AsyncOpenAI(base_url="http://t/v1", api_key="k", http_client=http, max_retries=0)
        return await fn(client)
    return asyncio.run(go())


@pytest.mark.slow
def test_real_frequency_penalty_changes_the_issue_example_streamed_and_not(smol_app):
    body = {"model": MODEL, "prompt": "the the the the the the the the", "max_tokens": 16, "temperature": 0}
    plain = _post(smol_app, COMPLETIONS, body).json()["choices"][0]["text"]
    penalised = _post(smol_app, COMPLETIONS, {**body, "frequency_penalty": 2.0}).json()["choices"][0]["text"]
    assert penalised != plain

    async def through_client(client):  # the openai client's own frequency_penalty argument
        return await client.completions.create(**body, frequency_penalty=2.0)
    assert _client_run(smol_app, through_client).choices[0].text == penalised
    events = _events(_post(smol_app, COMPLETIONS, {**body, "frequency_penalty": 2.0, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == penalised


@pytest.mark.slow
def test_real_stop_string_on_the_last_allowed_token_is_stop_over_http(smol_app):
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    free = _post(smol_app, COMPLETIONS, {**body, "logprobs": 0}).json()["choices"][0]
    eighth = free["logprobs"]["tokens"][7]  # the 8th token's text
    assert free["finish_reason"] == "length" and free["text"].endswith(eighth) and eighth not in free["text"][:-len(eighth)]
    got = _post(smol_app, COMPLETIONS, {**body, "stop": [eighth]}).json()["choices"][0]
    assert got["finish_reason"] == "stop" and got["text"] == free["text"][:-len(eighth)]
    events = _events(_post(smol_app, COMPLETIONS, {**body, "stop": [eighth], "stream": True}))
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_real_logprobs_through_the_openai_client(smol_app):
    async def run(client):
        comp = await client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                               temperature=0, logprobs=3)
        chat = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=4, temperature=0,
            logprobs=True, top_logprobs=3)
        stream = [c async for c in await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a color."}], max_tokens=4, temperature=0,
            logprobs=True, top_logprobs=3, stream=True)]
        return comp, chat, stream

    comp, chat, stream = _client_run(smol_app, run)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == comp.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and value == max(top.values()) == top[token] < 0  # greedy: the likeliest
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    for c in content:
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob
        assert bytes(c.bytes) == c.token.encode()
    streamed = [c for ch in stream if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]


@pytest.mark.slow
def test_real_n_seeded_through_the_openai_client(smol_app):
    kw = {"model": MODEL, "prompt": "My favourite animal is", "max_tokens": 8, "temperature": 1.0, "seed": 7}

    async def run(client):
        both = await client.completions.create(n=2, **kw)
        again = await client.completions.create(n=2, **kw)
        first = await client.completions.create(**kw)
        second = await client.completions.create(**{**kw, "seed": 8})
        chunks = [c async for c in await client.completions.create(n=2, stream=True, **kw)]
        return both, again, first, second, chunks

    both, again, first, second, chunks = _client_run(smol_app, run)
    texts = [c.text for c in sorted(both.choices, key=lambda c: c.index)]
    assert len(texts) == 2 and texts[0] != texts[1]  # distinct derived seeds: 7 and 8
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts  # reproducible
    assert [first.choices[0].text, second.choices[0].text] == texts  # choice i is the request with seed 7 + i
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(2)]
    assert streamed == texts
    assert both.usage.completion_tokens == first.usage.completion_tokens + second.usage.completion_tokens
    assert both.usage.prompt_tokens == second.usage.prompt_tokens
