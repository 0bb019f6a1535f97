"""The FastAPI app: OpenAI's `POST /v1/chat/completions` and `GET /v1/models`, plus `GET /health`
and `GET /metrics` (batch sizes, features-cache hits). Every route but `/health` needs
`Authorization: Bearer KEY` when an API key is set. Errors are OpenAI-style JSON with a 4xx status."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..options import GenerationOptions
from . import protocol
from .batcher import Batcher, Job, asyncio_delivery
from .errors import RequestError
from .images import ImagePolicy, load_request_image

log = logging.getLogger("somelvlm.serve")


@dataclass
class ServerConfig:
    """How the server behaves; `model_name` is what `/v1/models` lists and responses carry."""

    model_name: str = "somelvlm"
    api_key: str | None = None
    images: ImagePolicy = field(default_factory=ImagePolicy)
    defaults: GenerationOptions = field(default_factory=GenerationOptions)
    max_batch: int = 32
    batch_window_s: float = 0.01
    features_cache: int = 256


def _error(e: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    where = ".".join(loc) or "body"
    if err.get("type") == "extra_forbidden":
        return f"unknown field {where!r}: this server does not implement it", where
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    return f"{where}: {err.get('msg', 'invalid value')}", where


def create_app(model: Any, config: ServerConfig | None = None) -> FastAPI:
    """An app serving `model` (a loaded `SoMeLVLM` with a processor)."""
    config = config or ServerConfig()
    proc = model.require_processor()
    batcher = Batcher(model, max_batch=config.max_batch, window_s=config.batch_window_s,
                      cache_size=config.features_cache)
    num_queries = model.config.qformer.num_queries
    max_body = config.images.max_bytes * 4 // 3 + 1_000_000  # a base64 image plus the text

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(title="somelvlm", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(e.errors()))
        return _error(RequestError(message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(RequestError(str(e.detail), status=e.status_code, code="not_found" if e.status_code == 404 else None))

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if config.api_key and request.url.path != "/health":
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
                return _error(RequestError("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                           status=401, code="invalid_api_key", kind="authentication_error"))
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > max_body:
            return _error(RequestError(f"request body of {size} bytes is over the limit of {max_body} "
                                       "(one base64 image of --max-image-mb plus 1 MB of text)", status=413,
                                       code="request_too_large"))
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return batcher.metrics()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "somelvlm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest):
        if body.model not in (None, config.model_name):
            raise RequestError(f"model {body.model!r} is not served here; this server serves {config.model_name!r}",
                               status=404, param="model", code="model_not_found")
        ask = protocol.instruction(body)
        options = protocol.generation_options(body, config.defaults)
        protocol.check_fits(model, options, ask.prompt, ask.image_url is not None)
        # usage: the prompt's tokens plus the Q-Former's queries in front of it when there is an image
        total_prompt = len(proc.llm_tokenizer.encode(ask.prompt)) + (num_queries if ask.image_url else 0)
        image = None
        if ask.image_url is not None:
            image = await run_in_threadpool(load_request_image, ask.image_url, config.images)
        results: asyncio.Queue = asyncio.Queue()
        job = Job(ask.prompt, image, options, asyncio_delivery(asyncio.get_running_loop(), results), stream=body.stream)
        batcher.submit(job)
        cid = protocol.new_id()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(job, results, cid, config.model_name, total_prompt, include_usage),
                                     media_type="text/event-stream")
        try:
            kind, value = await results.get()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if kind == "error":
            return _generation_error(value)
        return protocol.completion(cid, config.model_name, total_prompt, value)

    return app


def _generation_error(e: Exception) -> JSONResponse:
    if isinstance(e, RequestError):
        return _error(e)
    if isinstance(e, (ValueError, TypeError)):
        return _error(RequestError(f"cannot answer this request: {e}", code="invalid_request"))
    return _error(RequestError(f"generation failed: {type(e).__name__}: {e}", status=500,
                               code="internal_error", kind="server_error"))


def _sse_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(job: Job, results: asyncio.Queue, cid: str, model_name: str, prompt_tokens: int,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a role chunk, content deltas, a finish chunk per choice, `[DONE]`."""
    created = int(time.time())
    n = job.options.num_return_sequences
    try:
        for i in range(n):
            yield _sse_event(protocol.chunk(cid, model_name, i, {"role": "assistant", "content": ""}, created=created))
        while True:
            kind, value = await results.get()
            if kind == "piece":
                yield _sse_event(protocol.chunk(cid, model_name, 0, {"content": value}, created=created))
                continue
            if kind == "error":
                yield _sse_event(json.loads(_generation_error(value).body))
                break
            for i, answer in enumerate(value):
                if not job.streams_pieces() and answer.text:
                    yield _sse_event(protocol.chunk(cid, model_name, i, {"content": answer.text}, created=created))
                yield _sse_event(protocol.chunk(cid, model_name, i, {}, answer.finish_reason, created=created))
            if include_usage:
                yield _sse_event(protocol.usage_chunk(cid, model_name, prompt_tokens, value))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that went away stops its stream's decoding
