"""The FastAPI routes: OpenAI's chat and legacy completions (streamed as SSE or not), models, health, metrics.

Every check that can refuse a request (body shape, model name, dashkv field, context limit, memory
bound) runs here, before the request is queued, so a refusal is an OpenAI-style JSON error with a 4xx
status and never reaches the engine. This module imports fastapi: import it only to serve (the `serve`
extra); `dashkv.serve` itself stays importable without it. A streamed response is only started once the engine produced its
first event, so a request that fails in prefill still gets a JSON 500 instead of a broken stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .engine import Delta, Engine, Failed, Finished, GenRequest
from .errors import APIError
from .schemas import ChatCompletionRequest, CompletionRequest, parse_dashkv_field

log = logging.getLogger("dashkv.serve")
FINGERPRINT = f"dashkv-{__version__}"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(engine: Engine, model_name: str, *, aliases: tuple[str, ...] = ()) -> Any:
    """The ASGI app serving `engine` under the model id `model_name` (also answering to `aliases`).

    The engine's worker thread is started and stopped by the app's lifespan."""
    names = (model_name, *aliases)
    started = int(time.time())
    metrics = engine.metrics

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="dashkv", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions over DASH-KV decoding")

    def count(request: Request, status: int) -> None:
        metrics.inc("dashkv_requests_total", endpoint=request.url.path, status=str(status))

    def error_response(request: Request, err: APIError) -> JSONResponse:
        count(request, err.status)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts, param = [], None
        for e in errors[:3]:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            if e.get("type") == "json_invalid":
                loc = []
            if param is None and loc:
                param = loc[0]  # the top-level field (deeper locs carry pydantic's union tags)
            parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
        message = "invalid request body: " + "; ".join(parts) if parts else "invalid request body"
        return error_response(request, APIError(400, message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(request, APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("dashkv serve: unexpected error on %s", request.url.path)
        return error_response(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                                code="internal_error"))

    # ---- helpers -----------------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name not in names:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def encode_chat(messages: list[dict[str, str]]) -> list[int]:
        tok = engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"the model '{model_name}' has no chat template; use /v1/completions",
                           param="messages")
        with engine.tok_lock:
            out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def encode_prompt(prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
            vocab = engine.model.get_input_embeddings().num_embeddings
            if any(not 0 <= x < vocab for x in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request is supported (got a list of "
                                    f"{len(prompt)})", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        with engine.tok_lock:
            return list(engine.tokenizer(prompt)["input_ids"])

    async def next_event(q: asyncio.Queue, req: GenRequest, request: Request) -> Any:
        """The engine's next event for `req`, or None once the client has gone away."""
        while True:
            try:
                return await asyncio.wait_for(q.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancel()
                    return None

    async def run(kind: str, body: Any, prompt_ids: list[int], request: Request) -> Any:
        body.check_n()
        mode = parse_dashkv_field(body.dashkv, engine.default_mode, engine.config)
        stops = body.stops()
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        max_tokens = engine.check(len(prompt_ids), body.max_new(), mode, param=param,
                                  prompt_param="messages" if kind == "chat" else "prompt")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = GenRequest(prompt_ids, max_tokens, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev),
                         stop=stops, sampling=body.sampling(), mode=mode)
        engine.submit(req)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + req.id
        created = int(time.time())

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if kind == "chat":
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "system_fingerprint": FINGERPRINT, "choices": [choice]}
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "system_fingerprint": FINGERPRINT, "choices": [choice]}

        first = await next_event(q, req, request)
        if first is None:
            count(request, 499)
            return Response(status_code=499)
        if isinstance(first, Failed):
            return error_response(request, first.error)

        if not body.stream:
            ev = first
            while not isinstance(ev, (Finished, Failed)):
                ev = await next_event(q, req, request)
                if ev is None:
                    count(request, 499)
                    return Response(status_code=499)
            if isinstance(ev, Failed):
                return error_response(request, ev.error)
            count(request, 200)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": ev.text}, "logprobs": None,
                          "finish_reason": ev.finish_reason}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name,
                                 "system_fingerprint": FINGERPRINT, "choices": [choice], "usage": ev.usage})

        include_usage = body.include_usage()

        async def stream() -> AsyncIterator[str]:
            done = False
            try:
                if kind == "chat":
                    yield _sse(chunk(None, None, role=True))
                ev = first
                while True:
                    if isinstance(ev, Delta):
                        yield _sse(chunk(ev.text, None))
                    elif isinstance(ev, Finished):
                        yield _sse(chunk(None, ev.finish_reason))
                        if include_usage:
                            yield _sse({**chunk(None, None), "choices": [], "usage": ev.usage})
                        yield "data: [DONE]\n\n"
                        done = True
                        count(request, 200)
                        return
                    else:  # Failed after the stream started: an error object, then the end marker
                        yield _sse(ev.error.body())
                        yield "data: [DONE]\n\n"
                        done = True
                        count(request, ev.error.status)
                        return
                    ev = await q.get()
            finally:
                if not done:  # the client went away mid-stream: free its row at the next step
                    req.cancel()
                    count(request, 499)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes --------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = await run_in_threadpool(encode_chat, messages)
        return await run("chat", body, ids, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        ids = await run_in_threadpool(encode_prompt, body.prompt)
        return await run("completion", body, ids, request)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "dashkv",
                "max_context": engine.max_context, "dashkv": {"default": engine.default_mode.label()}}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Any:
        count(request, 200)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> Any:
        check_model(name)
        count(request, 200)
        return model_card()

    @app.get("/health")
    async def health() -> Any:
        alive = engine.alive()
        body = {"status": "ok" if alive else "engine stopped", "model": model_name,
                "queue_depth": engine.queue_depth(), "running": engine.running_rows,
                "dashkv": engine.default_mode.label(), "version": __version__}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
