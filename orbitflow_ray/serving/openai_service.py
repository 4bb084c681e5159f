"""The OpenAI-compatible API's logic, without Ray: validate, tokenize, hand a `GenerateRequest` to a
worker, and turn its deltas into OpenAI responses or server-sent events.

`generate` is any callable returning an async iterator of `StreamDelta`s (the Ray ingress passes
one over a DeploymentHandle; tests pass a local worker). Its first delta is the worker's
acceptance (empty text), so refusals become HTTP errors before a stream starts. A worker that
dies mid-stream ends the stream with an OpenAI error event and `[DONE]`, never a hang. A request
with `n > 1` is n worker requests whose streams are merged by choice index (`choices.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, TypeVar

from fastapi.responses import JSONResponse, StreamingResponse

from orbitflow_ray.llm import chat_token_ids
from orbitflow_ray.model.loader import load_spec, load_tokenizer
from orbitflow_ray.sampling_params import SamplingParams
from orbitflow_ray.serving import choices
from orbitflow_ray.serving import protocol as p
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.serving.messages import GenerateRequest, StreamDelta, WorkerOverloaded

log = logging.getLogger(__name__)

Generate = Callable[[GenerateRequest], AsyncIterator[StreamDelta]]
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RETRY_AFTER_S = 1  # an overloaded worker frees a slot within about a second of decode steps
# Tokenizing a long prompt takes up to seconds: on the event loop it would stall every stream and
# /health. Two threads: the Rust tokenizer releases the GIL, and the ingress has few cores.
TOKENIZE_THREADS = 2
T = TypeVar("T")


class OpenAIService:
    def __init__(self, args: AppArgs, generate: Generate) -> None:
        self.args, self.generate = args, generate
        cfg = args.engine_config()
        spec = load_spec(args.model)
        self.max_model_len = min(cfg.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        self.vocab_size = spec.vocab_size
        self.default_tpot_slo_s = cfg.tpot_slo_s
        self.tokenizer = load_tokenizer(args.model)
        # No token covers more characters than its vocabulary entry has bytes (byte-level BPE) or
        # characters (SentencePiece), so a text of more than limit x this many characters is too long
        # to tokenize into `limit` tokens: refused without tokenizing it.
        self.max_token_chars = (max((len(t) for t in self.tokenizer.get_vocab()), default=1)
                                if self.tokenizer is not None else None)
        self._pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="orbitflow-tokenize")
        self.created = int(time.time())

    def models(self) -> dict:
        return p.models_response([self.args.name], self.created)

    def model(self, model: str) -> dict:
        """The model object of GET /v1/models/{model}; 404 for another name."""
        self._check_model(model)
        return self.models()["data"][0]

    # ---- requests -> GenerateRequest -----------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.args.name:
            raise p.model_not_found(model)

    def _ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if t >= self.vocab_size]
            if bad:
                raise p.BadRequestError(f"prompt token ids must be < {self.vocab_size}; got {bad[:3]}",
                                        param="prompt")
            return prompt
        if self.tokenizer is None:
            raise p.BadRequestError("this model has no tokenizer: send the prompt as token ids", param="prompt")
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _chat_ids(self, body: p.ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise p.BadRequestError("this model has no chat template; use /v1/completions", param="messages")
        return chat_token_ids(self.tokenizer, body.messages_as_dicts())

    def _precheck_length(self, chars: int, param: str) -> None:
        """Refuse a text too long to be `limit` tokens, by its length alone (see max_token_chars)."""
        cap = self.args.max_prompt_tokens
        limit = min(cap or self.max_model_len - 1, self.max_model_len - 1)
        if self.max_token_chars is None or chars <= limit * self.max_token_chars:
            return
        code = "prompt_too_long" if cap is not None and cap < self.max_model_len else "context_length_exceeded"
        raise p.BadRequestError(f"the prompt has {chars} characters: more than {limit} tokens (this server's "
                                f"limit), as no token of this model is longer than {self.max_token_chars} "
                                "characters", param=param, code=code)

    async def _off_loop(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _request(self, body, ids: list[int]) -> GenerateRequest:
        n = len(ids)
        what = "messages" if hasattr(body, "messages") else "prompt"
        if not n:
            raise p.BadRequestError("prompt is empty", param=what)
        if self.args.max_prompt_tokens is not None and n > self.args.max_prompt_tokens:
            raise p.BadRequestError(f"the prompt has {n} tokens; this server accepts at most "
                                    f"{self.args.max_prompt_tokens}", param=what, code="prompt_too_long")
        limit = body.output_limit()
        cap = self.args.max_output_tokens
        if limit is not None and cap is not None and limit > cap:
            raise p.BadRequestError(f"max_tokens={limit} is over this server's limit of {cap}",
                                    param="max_tokens")
        room = self.max_model_len - n
        if room < 1:
            raise p.BadRequestError(f"This model's maximum context length is {self.max_model_len} tokens; "
                                    f"the prompt has {n} tokens.", param="messages" if hasattr(body, "messages")
                                    else "prompt", code="context_length_exceeded")
        fit = limit is None
        if fit:  # OpenAI's defaults: 16 for completions, what fits for chat; never over the cap
            limit = min(room, cap or room, DEFAULT_MAX_TOKENS if not hasattr(body, "messages") else room)
        elif n + limit > self.max_model_len:
            raise p.BadRequestError(f"This model's maximum context length is {self.max_model_len} tokens. "
                                    f"However, you requested {n + limit} tokens ({n} in the prompt, {limit} "
                                    "for the completion).", param="max_tokens", code="context_length_exceeded")
        slo = body.slo
        if body.seed is not None and not 0 <= body.seed < 2 ** 63:
            raise p.BadRequestError("seed must be in [0, 2**63) (or -1: unset)", param="seed")
        stop_ids = body.stop_token_ids or []
        if any(t >= self.vocab_size for t in stop_ids):
            raise p.BadRequestError(f"stop_token_ids must be < {self.vocab_size}", param="stop_token_ids")
        bias = body.bias_by_token()
        if any(t >= self.vocab_size for t in bias):
            raise p.BadRequestError(f"logit_bias token ids must be < {self.vocab_size}", param="logit_bias")
        if body.min_tokens > limit:
            raise p.BadRequestError(f"min_tokens={body.min_tokens} is more than max_tokens={limit}"
                                    + (" (the default)" if fit else ""), param="min_tokens")
        try:
            params = SamplingParams(max_tokens=limit, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=body.seed, stop=body.stop_list(),
                                    stop_token_ids=list(stop_ids), ignore_eos=body.ignore_eos,
                                    presence_penalty=body.presence_penalty,
                                    frequency_penalty=body.frequency_penalty,
                                    repetition_penalty=body.repetition_penalty, logit_bias=bias,
                                    min_tokens=body.min_tokens, logprobs=body.num_logprobs(),
                                    slo_s=slo.tpot_s if slo is not None and slo.tpot_s else None,
                                    ttft_slo_s=slo.ttft_s if slo is not None and slo.ttft_s
                                    else self.args.default_ttft_slo_s)
        except ValueError as e:
            raise p.BadRequestError(str(e)) from None
        return GenerateRequest(f"{'chatcmpl' if hasattr(body, 'messages') else 'cmpl'}-{uuid.uuid4().hex}",
                               ids, params, time.time(), paced=body.stream, fit_max_tokens=fit)

    # ---- endpoints -----------------------------------------------------------------------------
    async def completion(self, body: p.CompletionRequest):
        self._check_model(body.model)
        prompt = body.prompt_input()
        if isinstance(prompt, str):
            self._precheck_length(len(prompt), "prompt")
        req = self._request(body, await self._off_loop(self._ids, prompt))
        return await self._respond(req, body, chat=False)

    async def chat(self, body: p.ChatCompletionRequest):
        self._check_model(body.model)
        self._precheck_length(sum(len(m.text()) for m in body.messages), "messages")
        req = self._request(body, await self._off_loop(self._chat_ids, body))
        return await self._respond(req, body, chat=True)

    async def _respond(self, req: GenerateRequest, body, chat: bool):
        reqs = choices.fan_out(req, body.n)
        streams: list = []
        try:
            for r in reqs:
                streams.append(self.generate(r))
                await self._accepted(streams[-1], r)
        except BaseException:
            await _close_all(streams)
            raise
        fmt = choices.LogprobFormatter(self.tokenizer) if body.num_logprobs() is not None else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(req, streams, chat, include_usage, fmt),
                                     media_type="text/event-stream")
        return JSONResponse(await self._collect(req, streams, chat, fmt))

    async def _accepted(self, stream, req: GenerateRequest) -> None:
        """Wait for the worker's acceptance (the first delta); its refusal becomes an HTTP error."""
        try:
            await anext(stream)
        except StopAsyncIteration:
            raise p.ServiceUnavailableError("the worker closed the request before accepting it") from None
        except WorkerOverloaded as e:
            raise p.RateLimitError(f"the server is at capacity ({_first_line(e)}); retry later",
                                   code="overloaded", retry_after_s=RETRY_AFTER_S) from None
        except ValueError as e:  # the engine refused the request (it cannot fit this worker, ...)
            raise p.BadRequestError(_first_line(e)) from None
        except Exception as e:
            log.warning("worker failed before accepting %s: %r", req.request_id, e)
            raise p.ServiceUnavailableError(f"no worker could take the request: {_first_line(e)}",
                                            retry_after_s=RETRY_AFTER_S) from None

    async def _collect(self, req: GenerateRequest, streams: list, chat: bool,
                       fmt: choices.LogprobFormatter | None) -> dict:
        n = len(streams)
        parts: list[list[str]] = [[] for _ in range(n)]
        lps: list[list] = [[] for _ in range(n)]
        last: list[StreamDelta | None] = [None] * n
        try:
            async for i, d in choices.merged(streams):
                parts[i].append(d.text)
                lps[i].extend(d.logprobs or [])
                last[i] = d
        except Exception as e:
            raise p.ServiceUnavailableError(f"the worker failed mid-request: {_first_line(e)}") from None
        finally:
            await _close_all(streams)
        if any(d is None or not d.finished for d in last):
            raise p.ServiceUnavailableError("the worker ended the request without finishing it")
        out = []
        for i, d in enumerate(last):
            text, reason = "".join(parts[i]), p.finish_reason_openai(d.finish_reason)
            if chat:
                out.append(p.chat_choice(i, text, reason, fmt.chat(lps[i]) if fmt else None))
            else:
                out.append(p.completion_choice(i, text, reason, fmt.completion(lps[i], 0)[0] if fmt else None))
        build = p.chat_response_of if chat else p.completion_response_of
        return build(req.request_id, self.args.name, int(req.arrival_unix), out,
                     p.usage(last[0].prompt_tokens, sum(d.completion_tokens for d in last)))

    async def _sse(self, req: GenerateRequest, streams: list, chat: bool, include_usage: bool,
                   fmt: choices.LogprobFormatter | None) -> AsyncIterator[str]:
        rid, model, created = req.request_id, self.args.name, int(req.arrival_unix)
        last: list[StreamDelta | None] = [None] * len(streams)
        offsets = [0] * len(streams)  # completions' text_offset, per choice
        try:
            if chat:
                for i in range(len(streams)):
                    yield p.sse(p.chat_chunk(rid, model, created, "", first=True, index=i))
            async for i, d in choices.merged(streams):
                last[i] = d
                reason = p.finish_reason_openai(d.finish_reason) if d.finished else None
                if not (d.text or reason or d.logprobs):
                    continue
                if chat:
                    lp = fmt.chat(d.logprobs or []) if fmt else None
                    yield p.sse(p.chat_chunk(rid, model, created, d.text or None, reason, index=i, logprobs=lp))
                else:
                    lp = None
                    if fmt:
                        lp, offsets[i] = fmt.completion(d.logprobs or [], offsets[i])
                    yield p.sse(p.completion_chunk(rid, model, created, d.text, reason, index=i, logprobs=lp))
            if include_usage and all(d is not None for d in last):
                u = p.usage(last[0].prompt_tokens, sum(d.completion_tokens for d in last))
                yield p.sse(p.chat_chunk(rid, model, created, None, usage=u) if chat
                            else p.completion_chunk(rid, model, created, "", usage=u))
        except Exception as e:  # the worker died or failed: tell the client, do not hang
            log.warning("stream %s failed: %r", rid, e)
            yield p.sse(p.ServiceUnavailableError(f"the worker failed mid-stream: {_first_line(e)}").body())
        finally:
            await _close_all(streams)
        yield p.SSE_DONE


async def _close_all(streams: list) -> None:
    for stream in streams:
        await _close(stream)


async def _close(stream) -> None:
    """Stop the worker side (an abandoned request is aborted there, its KV freed)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # closing a broken stream must not mask the real error
            pass


def _first_line(e: BaseException) -> str:
    """The message a client sees for a worker's exception: the original one when Ray wrapped it (a
    `RayTaskError` carries it as `cause`; its own text starts with the actor's name and pid)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[-1] if "Traceback" in text else text.splitlines()[0]
