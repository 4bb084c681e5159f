"""The choices of one OpenAI request: `n` engine requests fanned out and their streams merged, and
their log-probabilities in the response's shape.

`n > 1` is n independent engine requests (ids `<id>-0` ... `<id>-<n-1>`), each free to go to any
worker: the prompt's KV is computed once per choice, not shared. A seeded request gives choice i the
seed `seed + i` (mod 2**63), so the choices differ and each is reproducible on its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import AsyncIterator

from orbitflow_ray.outputs import TokenLogprobs
from orbitflow_ray.serving import responses
from orbitflow_ray.serving.messages import GenerateRequest, StreamDelta

_SEED_MOD = 2 ** 63


def fan_out(req: GenerateRequest, n: int) -> list[GenerateRequest]:
    """n engine requests for the n choices of `req` (req itself when n == 1)."""
    if n == 1:
        return [req]
    seed = req.params.seed
    return [replace(req, request_id=f"{req.request_id}-{i}",
                    params=replace(req.params, seed=None if seed is None else (seed + i) % _SEED_MOD))
            for i in range(n)]


async def merged(streams: list[AsyncIterator[StreamDelta]]) -> AsyncIterator[tuple[int, StreamDelta]]:
    """(choice index, delta) from every stream as each arrives. One stream is read directly, so a
    cancelled consumer cancels it in place; several are read by one task each, all cancelled when
    the consumer stops or one stream fails (its error is raised here). Closing the streams (which
    aborts their engine requests) is the caller's job."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[StreamDelta]) -> None:
        try:
            async for d in stream:
                await queue.put((i, d))
            await queue.put((i, None))
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LogprobFormatter:
    """Turns the engine's TokenLogprobs into OpenAI's shapes, with token texts from the tokenizer
    (each token decoded alone, as vLLM does; `token_id:<id>` without a tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def infos(self, lps: list[TokenLogprobs]) -> list[responses.TokenInfo]:
        return [(self._text(lp.token_id), lp.logprob, [(self._text(t), v) for t, v in lp.top]) for lp in lps]

    def completion(self, lps: list[TokenLogprobs], first_offset: int) -> tuple[dict, int]:
        """The completions `logprobs` object and the text offset after its last token."""
        infos = self.infos(lps)
        return (responses.completion_logprobs(infos, first_offset),
                first_offset + sum(len(text) for text, _, _ in infos))

    def chat(self, lps: list[TokenLogprobs]) -> dict:
        return responses.chat_logprobs(self.infos(lps))
