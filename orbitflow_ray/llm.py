"""The offline API, in vLLM's shape: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from orbitflow_ray.config import EngineConfig
from orbitflow_ray.engine import LLMEngine
from orbitflow_ray.outputs import RequestOutput
from orbitflow_ray.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Offline batch generation over the tiered-KV engine.

    >>> llm = LLM(model="smollm2-135m", kv_policy="static-uniform", device_kv_bytes=64 << 20)
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8))[0].text

    tensor_parallel_size=N shards the model over N Ray actors (one GPU each; one CPU each on the
    cpu backend), through the same `LLMEngine` the server runs.
    """

    def __init__(self, model: str = "smollm2-135m", tensor_parallel_size: int = 1, **engine_args) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, tensor_parallel_size=tensor_parallel_size,
                                             **engine_args))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = _broadcast(sampling_params, len(prompts))
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(p, sp))
        except ValueError:
            # One bad prompt must not leave half a batch queued.
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Apply the tokenizer's chat template, then generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([chat_token_ids(self.tokenizer, c) for c in convs], sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]

    def kv_stats(self) -> dict[str, int]:
        return self.engine.kv_stats()


def chat_token_ids(tokenizer, conversation: list[dict]) -> list[int]:
    """The prompt token ids of one conversation under the tokenizer's chat template (the offline
    API and the server use this one function, so their prompts are identical)."""
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


def _broadcast(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return params
