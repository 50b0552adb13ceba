"""The FastAPI app: `/v1/chat/completions`, `/v1/responses`, `/v1/models`, `/health`, `/metrics`, OpenAI error objects everywhere.

`build_app(config)` opens (or reuses, through the front door `xgenmm.client.open_engine`) the engine for `config.model` and
serves it; pass `llm=` to serve an `AsyncLLM` you already have. Every request first passes the `RequestGuard`
(Host, Origin, Content-Type; see guard.py); auth (Bearer API key) guards `/v1/*` and, when a key is set, `/metrics`;
`/health` stays open for probes. Every error response is counted in `xgenmm_http_requests_total`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..async_llm import AsyncLLM
from ..client import open_engine
from ..client.inputs import release_freed_memory
from .chat import ChatCompletionService, ClientDisconnected
from .config import ServerConfig
from .errors import AUTHENTICATION, NOT_FOUND, OpenAIError, error_from_exception
from .guard import RequestGuard
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import parse_json_body
from .responses_api import ResponsesService

logger = logging.getLogger("xgenmm.server")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_TRIM_AFTER_BODY_BYTES = 4 * 1024**2


def _error_response(err: OpenAIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)


async def read_body_limited(request: Request, limit: int, chunk_timeout_s: float | None = None,
                            total_timeout_s: float | None = None) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all, and (408, closing the
    connection) a body whose next chunk takes over `chunk_timeout_s` or whose whole takes over `total_timeout_s`.
    A client that goes away mid-body raises starlette's `ClientDisconnect`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(f"the request body is {int(declared)} bytes; the limit is {limit} "
                          "(xgenmm serve --max-request-bytes)", 413, param=None, code="request_too_large")
    loop = asyncio.get_running_loop()
    deadline = None if total_timeout_s is None else loop.time() + total_timeout_s
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        wait = chunk_timeout_s
        if deadline is not None:
            wait = min(wait, deadline - loop.time()) if wait is not None else deadline - loop.time()
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(wait, 0.0) if wait is not None else None)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise OpenAIError("the request body was sent too slowly (xgenmm serve --body-chunk-timeout / "
                              "--body-timeout)", 408, param=None, code="request_timeout") from None
        size += len(chunk)
        if size > limit:
            raise OpenAIError(f"the request body exceeds the limit of {limit} bytes (xgenmm serve --max-request-bytes)",
                              413, param=None, code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(config: ServerConfig, llm: AsyncLLM | None = None) -> FastAPI:
    config.validate()
    if llm is None:  # the front door: shared with any other client of the same engine in this process
        llm = AsyncLLM.from_handle(open_engine("native", config.model, config.device, config.dtype,
                                               **config.engine_options))
    metrics = ServerMetrics(llm.handle.core, config.model_name)
    service = ChatCompletionService(llm, config, metrics)
    responses = ResponsesService(llm, config, metrics)
    api_key = config.resolved_api_key()

    app = FastAPI(title="xgenmm OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llm = llm
    app.state.config = config
    app.state.metrics = metrics

    async def require_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise OpenAIError("invalid or missing API key: send 'Authorization: Bearer <key>'", 401, AUTHENTICATION,
                              None, "invalid_api_key")

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError):
        metrics.count_error(exc.status)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 408:
            headers = {"Connection": "close"}  # the rest of a slow body is never read: the connection cannot go on
        return _error_response(exc, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = OpenAIError(f"unknown route {request.method} {request.url.path}", 404, NOT_FOUND, None,
                              "unknown_url")
        elif exc.status_code == 405:
            err = OpenAIError(f"method {request.method} is not allowed on {request.url.path}", 405, param=None,
                              code="method_not_allowed")
        else:
            err = OpenAIError(str(exc.detail), exc.status_code, param=None)
        metrics.count_error(err.status)
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        metrics.count_error(400)
        return _error_response(OpenAIError(f"invalid request: {exc.errors()}", 400))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unexpected error")
        err = error_from_exception(exc)
        metrics.count_error(err.status)
        return _error_response(err)

    @app.get("/health")
    async def health():
        stats = llm.stats()
        return {"status": "ok", "model": config.model_name, "num_running": stats.num_running,
                "num_waiting": stats.num_waiting}

    metrics_auth = [Depends(require_api_key)] if config.metrics_require_api_key else []

    @app.get("/metrics", dependencies=metrics_auth)
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "xgenmm",
                "max_model_len": llm.handle.max_model_len}

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
    async def get_model(model_id: str):
        if model_id != config.model_name:
            raise OpenAIError(f"the model {model_id!r} does not exist on this server", 404, NOT_FOUND, "model",
                              "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
    async def chat_completions(request: Request):
        return await _serve(request, service.create)

    @app.post("/v1/responses", dependencies=[Depends(require_api_key)])
    async def create_response(request: Request):
        return await _serve(request, responses.create_response)

    async def _serve(request: Request, create):
        try:
            raw = await read_body_limited(request, config.max_request_bytes, config.body_chunk_timeout_s,
                                          config.body_timeout_s)
        except ClientDisconnect:  # the client left mid-upload: its event, not a server error
            metrics.requests.labels("disconnected").inc()
            return Response(status_code=499)
        try:
            body = parse_json_body(raw)
            result = await create(body, request.is_disconnected)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening; logged by the access log only
        finally:
            if len(raw) >= _TRIM_AFTER_BODY_BYTES:
                del raw
                release_freed_memory()  # large bodies (base64 images) must not stay in the heap once handled
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)

    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], allow_credentials=False)
    app.add_middleware(RequestGuard, accepted_hosts=config.accepted_hosts(), allowed_origins=config.allowed_origins,
                       on_refusal=metrics.count_error)  # added last: runs first
    return app
