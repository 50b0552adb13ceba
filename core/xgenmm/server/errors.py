"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every failure caused by the request (bad JSON, bad image, unknown model, invalid option, prompt too long) is a 4xx;
a 5xx means the server itself failed. `error_from_exception` is the one place that maps xgenmm's typed errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import (
    EngineDeadError,
    ImageError,
    ImageSourceNotAllowedError,
    ImageTooLargeError,
    PromptError,
    PromptTooLongError,
    RequestAbortedError,
    SamplingParamsError,
)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
OVERLOADED = "service_unavailable_error"


class OpenAIError(Exception):
    """An error to send back as an OpenAI error object (raised anywhere in request handling)."""

    def __init__(self, message: str, status: int = 400, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None):
        message = _encodable(message)
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = _encodable(param) if param is not None else None
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _encodable(text: str) -> str:
    """Error text may echo what a client sent: lone surrogates become `\\udXXX` escapes, so it always encodes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class _Mapping:
    status: int
    type: str
    code: str


# Most specific first.
_MAPPINGS: tuple[tuple[type[BaseException], _Mapping], ...] = (
    (PromptTooLongError, _Mapping(400, INVALID_REQUEST, "context_length_exceeded")),
    (ImageSourceNotAllowedError, _Mapping(400, INVALID_REQUEST, "image_source_not_allowed")),
    (ImageTooLargeError, _Mapping(400, INVALID_REQUEST, "image_too_large")),
    (ImageError, _Mapping(400, INVALID_REQUEST, "invalid_image")),
    (PromptError, _Mapping(400, INVALID_REQUEST, "invalid_prompt")),
    (SamplingParamsError, _Mapping(400, INVALID_REQUEST, "invalid_sampling_option")),
    (RequestAbortedError, _Mapping(503, OVERLOADED, "request_aborted")),
    (EngineDeadError, _Mapping(503, OVERLOADED, "engine_dead")),
)


def error_from_exception(exc: BaseException, param: str | None = None) -> OpenAIError:
    """The OpenAI error for any exception raised while serving a request (unknown ones are 500s)."""
    if isinstance(exc, OpenAIError):
        return exc
    for cls, m in _MAPPINGS:
        if isinstance(exc, cls):
            return OpenAIError(str(exc), m.status, m.type, param if m.status < 500 else None, m.code)
    return OpenAIError(f"internal server error ({type(exc).__name__})", 500, SERVER_ERROR, None, "internal_error")
