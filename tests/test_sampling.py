"""Sampling features (issue 17): the sampler's logit edits checked by hand on small rows,
SamplingParams validation, the engine on tiny-llama, and SmolLM2 checks against the issue's inputs
and a direct Hugging Face computation.

Run: .venv/bin/python -m pytest -q tests/test_sampling.py
"""

from __future__ import annotations

import math

import pytest
import torch

from orbitflow_ray import SamplingParams
from orbitflow_ray.llm import LLM
from orbitflow_ray.model.sampler import apply_logit_edits, sample, token_logprobs
from orbitflow_ray.kv.plan import ScheduledSeq

ROW = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])


def _seq(sp: SamplingParams, prompt=(), output=()) -> ScheduledSeq:
    return ScheduledSeq("r", [0], 0, True, [], sp, len(output), prompt_token_ids=list(prompt),
                        output_token_ids=list(output))


# ---- the sampler's math, by hand -------------------------------------------------------------------

def test_frequency_and_presence_penalties_count_output_tokens_only():
    sp = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_logit_edits(ROW, sp, prompt_ids=[1, 1, 2], output_ids=[0, 3, 3, 3])
    # token 0 once: 2 - 0.5 - 0.25; token 3 three times: 3 - 1.5 - 0.25; prompt tokens 1, 2 untouched
    assert got.tolist() == [1.25, -1.0, 0.5, 1.25, -2.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    sp = SamplingParams(repetition_penalty=2.0)
    got = apply_logit_edits(ROW, sp, prompt_ids=[1, 3], output_ids=[0])
    assert got.tolist() == [1.0, -2.0, 0.5, 1.5, -2.0]


def test_logit_bias_adds_and_min_tokens_bans_eos_and_stop_ids_until_reached():
    sp = SamplingParams(logit_bias={4: 10.0, 0: -100}, min_tokens=2, stop_token_ids=[2], eos_token_ids=(1,))
    got = apply_logit_edits(ROW, sp, [], output_ids=[3])
    assert got.tolist() == [-98.0, -math.inf, -math.inf, 3.0, 8.0]
    after = apply_logit_edits(ROW, sp, [], output_ids=[3, 3])  # min_tokens reached: nothing banned
    assert after.tolist() == [-98.0, -1.0, 0.5, 3.0, 8.0]
    ignoring = SamplingParams(min_tokens=2, eos_token_ids=(1,), ignore_eos=True)  # EOS does not stop it
    assert apply_logit_edits(ROW, ignoring, [], []).tolist() == ROW.tolist()


def test_a_tiny_repetition_penalty_cannot_make_the_draw_fail():
    """Found by schemathesis: repetition_penalty=5e-324 (> 0, so valid) made a logit +inf and the
    temperature draw's probabilities NaN, which raised on the engine thread."""
    sp = SamplingParams(repetition_penalty=5e-324, temperature=1.0, seed=3)
    row = apply_logit_edits(ROW, sp, prompt_ids=[0, 3], output_ids=[])
    assert torch.isfinite(row).all() and row[0] == row[3] == 1e30
    assert sample(ROW[None], [_seq(sp, prompt=[0, 3])]) in ([0], [3])
    assert sample(ROW[None], [_seq(SamplingParams(repetition_penalty=5e-324), prompt=[0, 3])]) == [0]


def test_a_tiny_repetition_penalty_keeps_banned_tokens_banned():
    """Found by schemathesis: repetition_penalty=5e-324 rounds to 0 in float32, and a token that
    min_tokens bans (-inf) and the prompt holds became -inf x 0 = NaN: the draw raised and took the
    engine thread down (503)."""
    sp = SamplingParams(repetition_penalty=5e-324, min_tokens=2, stop_token_ids=[2], eos_token_ids=(1,), top_p=5e-324)
    row = apply_logit_edits(ROW, sp, prompt_ids=[1, 2, 3], output_ids=[])
    assert torch.equal(row, torch.tensor([2.0, -math.inf, -math.inf, 1e30, -2.0]))  # 3 capped; 0 and 4 not seen
    assert sample(ROW[None], [_seq(sp, prompt=[1, 2, 3])]) == [3]


def test_sample_greedy_follows_the_edits_and_leaves_plain_rows_alone():
    logits = torch.stack([ROW, ROW])
    plain, biased = SamplingParams(), SamplingParams(logit_bias={2: 3.0})
    assert sample(logits, [_seq(plain), _seq(biased)]) == [3, 2]
    pen = SamplingParams(frequency_penalty=2.0)
    assert sample(ROW[None], [_seq(pen, output=[3])]) == [0]  # 3 - 2 = 1 < 2


def test_raw_logprobs_are_log_softmax_before_edits_and_temperature():
    sp = SamplingParams(logprobs=2, logit_bias={4: 100.0}, temperature=0.7, seed=1)
    seq = _seq(sp)
    tok = sample(ROW[None], [seq])[0]
    assert tok == 4  # the bias decided the draw ...
    ref = torch.log_softmax(ROW, -1)  # ... but logprobs describe the model's own distribution
    assert seq.logprobs.token_id == 4 and seq.logprobs.logprob == pytest.approx(float(ref[4]))
    assert [t for t, _ in seq.logprobs.top] == [3, 0]
    assert [lp for _, lp in seq.logprobs.top] == pytest.approx([float(ref[3]), float(ref[0])])
    assert token_logprobs(ROW, 1, 0).top == ()
    assert _seq(SamplingParams()).logprobs is None and sample(ROW[None], [_seq(SamplingParams())]) == [3]


# ---- SamplingParams validation ---------------------------------------------------------------------

@pytest.mark.parametrize("kw, fragment", [
    ({"presence_penalty": 2.5}, "presence_penalty must be a number in [-2.0, 2.0]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a number > 0"),
    ({"logit_bias": {5: 101}}, "logit_bias[5] must be a number in [-100, 100]"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias keys must be token ids"),
    ({"min_tokens": 17}, "min_tokens must be an integer in [0, max_tokens=16]"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"logprobs": 21}, "logprobs must be an integer in [0, 20]"),
    ({"logprobs": True}, "logprobs must be an integer"),
    ({"stop_token_ids": [-3]}, "stop_token_ids must be token ids"),
])
def test_sampling_params_reject_bad_values_with_the_field_name(kw, fragment):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    assert fragment in str(e.value)


def test_vocab_check_names_the_field():
    sp = SamplingParams(logit_bias={511: 1.0, 512: 1.0})
    sp.check_vocab(513)
    with pytest.raises(ValueError, match=r"logit_bias token ids must be < the vocabulary size 512, got \[512\]"):
        sp.check_vocab(512)


# ---- the engine on tiny-llama ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    llm = LLM(model="tiny-llama", device_kv_bytes=8 << 20, host_kv_bytes=8 << 20)
    yield llm
    llm.engine.close()


PROMPT = [1, 5, 9, 200, 31, 7, 7, 7]


def test_engine_penalties_change_greedy_output_and_defaults_do_not(tiny):
    base = tiny.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    neutral = SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=0.0, repetition_penalty=1.0)
    assert tiny.generate([PROMPT], neutral)[0].token_ids == base
    pen = tiny.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=2.0,
                                                 repetition_penalty=1.5))[0].token_ids
    assert pen != base
    banned = tiny.generate([PROMPT], SamplingParams(max_tokens=12, ignore_eos=True,
                                                    logit_bias={t: -100 for t in set(base)}))[0].token_ids
    assert not set(banned) & set(base)


def test_engine_min_tokens_holds_back_stop_token_ids(tiny):
    first = tiny.generate([PROMPT], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids[0]
    stopped = tiny.generate([PROMPT], SamplingParams(max_tokens=6, stop_token_ids=[first]))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = tiny.generate([PROMPT], SamplingParams(max_tokens=6, stop_token_ids=[first], min_tokens=4))[0]
    assert first not in held.token_ids[:4] and len(held.token_ids) >= 4


def test_engine_logprobs_one_entry_per_token_greedy_is_the_top(tiny):
    out = tiny.generate([PROMPT], SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3))[0]
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    for lp in out.logprobs:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id and lp.logprob == lp.top[0][1] <= 0
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert tiny.generate([PROMPT], SamplingParams(max_tokens=2))[0].logprobs is None


def test_engine_rejects_out_of_vocab_bias(tiny):
    with pytest.raises(ValueError, match="logit_bias token ids must be < the vocabulary size 512"):
        tiny.generate([PROMPT], SamplingParams(logit_bias={600: 1.0}))


# ---- SmolLM2 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    llm = LLM(model="smollm2-135m")
    yield llm
    llm.engine.close()


@pytest.mark.slow
def test_smollm2_frequency_penalty_changes_the_issue_example(smol):
    prompt = "the the the the the the the the"
    plain = smol.generate([prompt], SamplingParams(max_tokens=16))[0].text
    penalised = smol.generate([prompt], SamplingParams(max_tokens=16, frequency_penalty=2.0))[0].text
    assert penalised != plain


@pytest.mark.slow
def test_smollm2_stop_string_on_the_last_allowed_token_finishes_with_stop(smol):
    """Issue 17 case 6: the 8th token's text as the stop string, max_tokens 8."""
    prompt = "The capital of France is"
    full = smol.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    eighth = smol.engine.tokenizer.decode([full.token_ids[7]])
    assert eighth.strip() and eighth not in smol.engine.tokenizer.decode(full.token_ids[:7])
    out = smol.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True, stop=[eighth]))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids
    assert out.text == full.text[:full.text.rindex(eighth)]


@pytest.mark.slow
def test_smollm2_first_token_logprobs_match_transformers(smol):
    from orbitflow_ray.model.loader import build_hf_reference, load_model
    prompt = "The capital of France is"
    out = smol.generate([prompt], SamplingParams(max_tokens=3, logprobs=5))[0]
    ids = smol.engine.tokenizer.encode(prompt, add_special_tokens=False)
    hf = build_hf_reference(load_model("smollm2-135m"))
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
    first = out.logprobs[0]
    assert first.token_id == int(ref.argmax()) and first.logprob == pytest.approx(float(ref.max()), abs=1e-4)
    top_ids = torch.topk(ref, 5).indices.tolist()
    assert [t for t, _ in first.top] == top_ids
    assert [v for _, v in first.top] == pytest.approx([float(ref[t]) for t in top_ids], abs=1e-4)
