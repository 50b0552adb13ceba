"""The FastAPI app: `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`, OpenAI error objects everywhere.

`build_app(config)` creates (or reuses, through the process-wide registry) the engine for `config.model` and
serves it; pass `llm=` to serve an `AsyncLLM` you already have. Auth (Bearer API key) guards `/v1/*`; `/health`
and `/metrics` stay open for probes and scrapers (the server binds to loopback unless told otherwise).
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..async_llm import AsyncLLM
from .chat import ChatCompletionService, ClientDisconnected
from .config import ServerConfig
from .errors import AUTHENTICATION, NOT_FOUND, OpenAIError, error_from_exception
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import parse_json_body

logger = logging.getLogger("xgenmm.server")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error_response(err: OpenAIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(f"the request body is {int(declared)} bytes; the limit is {limit} "
                          "(xgenmm serve --max-request-bytes)", 413, param=None, code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(f"the request body exceeds the limit of {limit} bytes (xgenmm serve --max-request-bytes)",
                              413, param=None, code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(config: ServerConfig, llm: AsyncLLM | None = None) -> FastAPI:
    if llm is None:
        llm = AsyncLLM(config.model, config.device, config.dtype, **config.engine_options)
    metrics = ServerMetrics(llm.engine, config.model_name)
    service = ChatCompletionService(llm, config, metrics)
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
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
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
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return _error_response(OpenAIError(f"invalid request: {exc.errors()}", 400))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unexpected error")
        return _error_response(error_from_exception(exc))

    @app.get("/health")
    async def health():
        stats = llm.stats()
        return {"status": "ok", "model": config.model_name, "num_running": stats.num_running,
                "num_waiting": stats.num_waiting}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "xgenmm",
                "max_model_len": llm.engine.max_model_len}

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
        try:
            body = parse_json_body(await read_body_limited(request, config.max_request_bytes))
            result = await service.create(body, request.is_disconnected)
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening; logged by the access log only
        except OpenAIError as err:
            metrics.count_error(err.status)
            raise
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)

    return app
