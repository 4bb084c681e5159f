"""The HTTP surface: a FastAPI app over an `OpenAIService`. Every error, including malformed JSON
and wrong types, leaves as an OpenAI-style error body with a 4xx status; only a bug is a 500.

Built by a factory, not at import time, so the Ray ingress (`__serve_build_asgi_app__`) and tests
without Ray serve the very same app.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from orbitflow_ray.serving import protocol as p
from orbitflow_ray.serving.openai_service import OpenAIService

log = logging.getLogger(__name__)


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON: messages may quote client input (a model name), which may hold a
    lone surrogate that UTF-8 cannot encode; Starlette's default would turn the 4xx into a 500."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def build_api(service: OpenAIService, state: Callable[[], Awaitable[dict]] | None = None) -> FastAPI:
    app = FastAPI(title="OrbitFlow", version="0.1.0",
                  description="OpenAI-compatible, SLO-aware long-context LLM serving. Extension fields: "
                              "`slo` {ttft_s, tpot_s}, `top_k`, `ignore_eos`, `stop_token_ids`, `repetition_penalty`, "
                              "`min_tokens`. Unsupported fields are refused by name (400).")

    @app.exception_handler(p.APIError)
    async def _api_error(_: Request, e: p.APIError) -> JSONResponse:
        return ErrorResponse(e.body(), status_code=e.status_code, headers=e.headers())

    # add_middleware wraps what is there: CORS runs first (a browser's preflight never carries the
    # key, so it must not need it), then the key, then the body limit.
    app.add_middleware(BodyLimit, max_bytes=service.args.max_request_body_bytes)
    key = service.args.api_key or os.environ.get("ORBITFLOW_API_KEY") or None
    if key is not None:
        app.add_middleware(RequireKey, key=key)
    app.add_middleware(CORSMiddleware, allow_origins=service.args.allowed_origins, allow_methods=["*"],
                       allow_headers=["*"])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = p.validation_error_message(e)
        return ErrorResponse(p.error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return ErrorResponse(p.error_body(str(e.detail), type=kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ErrorResponse(p.error_body(f"internal error: {type(e).__name__}", type="server_error"),
                             status_code=500)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return service.models()

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        return service.model(model)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request):
        return await _unless_disconnected(request, service.completion(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        return await _unless_disconnected(request, service.chat(body))

    if state is not None:
        @app.get("/v1/orbitflow/state")
        async def orbitflow_state() -> dict:
            """The central planner's view: per worker, running/waiting/paused requests, KV bytes per
            tier, plan version (no prompt text)."""
            return await state()

    return app


class RequireKey:
    """Pure ASGI middleware: every /v1/* route needs `Authorization: Bearer <key>` (the scheme in any
    case, as RFC 9110 says; the key compared in constant time); /health stays open."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self._authorized(scope):
            e = p.AuthenticationError("Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
            return await ErrorResponse(e.body(), status_code=401)(scope, receive, send)
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.strip().partition(b" ")
        return hmac.compare_digest(scheme.lower(), b"bearer") & hmac.compare_digest(token.strip(), self.key)


class BodyLimit:
    """Pure ASGI middleware: a body over `max_bytes` is a 413 with an OpenAI error body, judged by
    Content-Length before reading, or while reading a chunked body, so memory stays bounded. The
    body read is replayed to the app, followed by the server's own messages (the disconnect)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()
        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        e = p.APIError(f"the request body is over this server's limit of {self.max_bytes} bytes",
                       status_code=413, type="invalid_request_error", code="request_too_large")
        await ErrorResponse(e.body(), status_code=413)(scope, receive, send)


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Await `work` (tokenizing, then a whole non-streamed generation) unless the client leaves first.

    Starlette does not cancel a handler whose client is gone (Ray Serve's proxy does), so a
    non-streaming request would run to max_tokens for nobody. Cancelling `work` runs its `finally`
    blocks, which close the worker stream: the engine aborts the request and frees its KV at its
    next step boundary. A streamed response returns at once, before the first token; from then on
    Starlette's StreamingResponse watches for the disconnect itself.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (Serve's proxy saw the client leave)
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        log.info("client left before the response; request cancelled")
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects. The body has been read, so the server's next message
    on this connection is http.disconnect (uvicorn's receive blocks until then)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the server cannot tell (a proxy's receive failed): serve on, as without a watch
        await asyncio.Event().wait()
