"""Incremental detokenization (`orbitflow_ray/detokenizer.py`): decoding only each step's new tail
gives exactly the text of a full decode, multi-byte characters split across tokens included, and
stop strings that span token boundaries cut the text where a full decode would."""

from types import SimpleNamespace

import pytest

from orbitflow_ray.detokenizer import IncrementalDetokenizer
from orbitflow_ray.engine import LLMEngine
from orbitflow_ray.model.loader import load_tokenizer
from orbitflow_ray.request import Request
from orbitflow_ray.sampling_params import SamplingParams

TEXT = "Grüße aus Köln 🌍🚀 — 東京タワーの夜景… naïve café 🧑‍🚀 ok. "


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def _ids(tokenizer):
    ids = tokenizer.encode(TEXT * 12, add_special_tokens=False)
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return ids[:150] + [special] + ids[150:]  # a special token mid-stream: skipped by both decodes


def test_text_equals_a_full_decode_at_every_token(tokenizer):
    ids = _ids(tokenizer)
    assert len(ids) > 300
    d = IncrementalDetokenizer(tokenizer)
    partial = 0
    for k in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:k], skip_special_tokens=True)
        assert d.update(ids[:k]) == full, k
        partial += full.endswith("\ufffd")
    assert partial > 0  # some characters did span tokens
    assert d.update(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="shrank"):
        d.update(ids[:-1])


@pytest.mark.parametrize("stop", ["タワーの", "🚀 —", "é 🧑", "ok. Gr"])
def test_stop_strings_across_token_boundaries(tokenizer, stop):
    ids = _ids(tokenizer)
    engine = SimpleNamespace(tokenizer=tokenizer)
    req = Request("r", [1], SamplingParams(max_tokens=len(ids), stop=["never-there", stop]))
    hit, steps = None, 0
    for tok in ids:
        req.output_token_ids.append(tok)
        steps += 1
        hit = LLMEngine._check_stop_strings(engine, req, True)
        if hit is not None:
            break
    full = tokenizer.decode(ids[:steps], skip_special_tokens=True)
    assert hit == stop
    assert req.output_text == full[: full.index(stop)]
    # it stopped at the first token that completes the match, not later
    assert stop not in tokenizer.decode(ids[:steps - 1], skip_special_tokens=True)
