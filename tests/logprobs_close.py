"""vLLM's `check_logprobs_close` rule, shared by the tests that compare two greedy runs whose float
summation order differs (batched attention against HF, tensor-parallel shards against one device)."""

from __future__ import annotations


def check_logprobs_close(got: dict, ref: dict, label: str, against: str = "HF") -> int:
    """vLLM's rule, per prompt: ids equal, or at the first divergence each side's token is in the
    other's top-5 (comparison stops there). got/ref: {name: (token ids, per token {id: logprob})}.
    Returns (and prints) the number of such flips."""
    flips = 0
    for name, (ids, top) in got.items():
        ref_ids, ref_top = ref[name]
        for pos, (a, b) in enumerate(zip(ids, ref_ids)):
            if a != b:
                assert a in ref_top[pos] and b in top[pos], (
                    f"{label}/{name}: token {pos} is {a}, {against}'s {b}; ours top-5 {top[pos]}, "
                    f"{against}'s {ref_top[pos]}")
                flips += 1
                break
        else:
            assert len(ids) == len(ref_ids), f"{label}/{name}: {len(ids)} tokens, {against} {len(ref_ids)}"
    print(f"{label}: {flips} near-tie flip(s) against {against} over {len(got)} prompts")
    return flips
