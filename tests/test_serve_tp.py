"""A tensor-parallel worker replica on local Ray, driven by the real `openai` client: one replica of
`tiny-llama` at TP 2 (two shard actors in a placement group) answers what the offline TP-1 engine
generates (vLLM's logprob-close rule, see tests/logprobs_close.py); a shard actor killed mid-stream
ends the stream with an error, and Serve replaces the replica, which serves again.

tiny-llama has no tokenizer, so prompts are token ids and outputs are read back from the
completions `logprobs` (`token_id:<id>` entries)."""

import pytest
from logprobs_close import check_logprobs_close

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from orbitflow_ray import LLM, SamplingParams  # noqa: E402
from serve_util import serve_app, wait_for  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(600)]

MODEL = "tiny-llama"
ENGINE = {"kv_policy": "orbitflow", "plan_windows": [8], "device_kv_bytes": 1 << 20, "host_kv_bytes": 4 << 20,
          "tpot_slo_s": 100.0, "token_deposit": False}
PROMPTS = [[1, 17, 300, 42, 9, 250, 77], [1] + list(range(100, 140))]
MAX_TOKENS = 16


def _ids(entries) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in entries]


@pytest.fixture(scope="module")
def app():
    args = {"model": MODEL, "tensor_parallel_size": 2, "engine": ENGINE, "torch_threads": 1,
            "telemetry_period_s": 0.3}
    with serve_app(args, {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}, num_cpus=4) as base:
        yield base


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=f"{app}/v1", api_key="unused", max_retries=0, timeout=120)


def _complete(client, prompt) -> tuple[list[int], list[dict[int, float]]]:
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=5,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    return _ids(lp.tokens), [{int(t.removeprefix("token_id:")): v for t, v in top.items()} for top in lp.top_logprobs]


def _shards() -> dict[str, dict]:
    """The live shard actors' {name: named-actor entry} (named `orbitflow-tp-shard-<group>-<rank>`)."""
    return {a["name"]: a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("orbitflow-tp-shard-")}


def test_tp2_replica_answers_what_the_offline_engine_generates(client):
    llm = LLM(MODEL, **{k: v for k, v in ENGINE.items()})
    try:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True))
    finally:
        llm.engine.close()
    ref = {i: (o.token_ids, [dict(lp.top) for lp in o.logprobs]) for i, o in enumerate(outs)}
    got = {i: _complete(client, p) for i, p in enumerate(PROMPTS)}
    check_logprobs_close(got, ref, "serve TP2", against="offline TP1")
    assert all(len(ids) == MAX_TOKENS for ids, _ in got.values())
    assert len(_shards()) == 2


def test_a_killed_shard_ends_the_stream_with_an_error_and_serve_replaces_the_replica(client):
    shards = _shards()
    assert len(shards) == 2
    # logprobs: without a tokenizer the text deltas are empty, and only chunks with content are sent
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=1500, temperature=0,
                                       stream=True, logprobs=1, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    next(chunks)  # the stream is running
    victim = sorted(shards.values(), key=lambda a: a["name"])[1]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    with pytest.raises(openai.APIError):  # the ingress's error event, not a normal end
        for _ in chunks:
            pass
    wait_for(lambda: len(_shards()) == 2 and set(_shards()).isdisjoint(shards), 180,
             "a new replica with two new shard actors")
    ids, _ = wait_for(lambda: _try_complete(client), 120, "the new replica to answer")
    assert len(ids) == MAX_TOKENS


def _try_complete(client):
    try:
        return _complete(client, PROMPTS[0])
    except openai.APIError:
        return None
