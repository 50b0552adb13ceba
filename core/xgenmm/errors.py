"""Typed errors. Every user-facing failure is one of these, and names what is wrong and what to do about it.

Front ends turn them into their own language by type (the server: HTTP 4xx with `param`; the CLI: one line on
stderr and a non-zero exit), never by parsing the message text: an error about one field says which (`.field`).
"""

from __future__ import annotations


class XGenMMError(Exception):
    """Base class of every error raised by xgenmm."""


class CheckpointError(XGenMMError):
    """A checkpoint directory is missing, incomplete, corrupt or does not match the config."""


class ModelNotFoundError(CheckpointError):
    """A model could not be resolved to a local directory: a local path that does not exist, or a Hugging Face id
    that is not in the cache and could not be downloaded."""


class ConfigError(XGenMMError, ValueError):
    """An invalid setting: config.json (or a preprocessor / generation config), or an engine / policy option."""


class DeviceError(ConfigError):
    """A device this torch build or machine cannot run on (e.g. "cuda" on a CPU-only torch), or an unknown name."""


class DtypeError(ConfigError):
    """A model dtype that is not one of the allowed values."""


class ImageError(XGenMMError, ValueError):
    """An image could not be read or decoded."""


class ImageTooLargeError(ImageError):
    """An image exceeds the configured byte or pixel limit."""


class ImageSourceNotAllowedError(ImageError):
    """An image source (remote URL, local file) is refused by the input policy."""


class PromptError(XGenMMError, ValueError):
    """A prompt is malformed (bad message, unknown content part, ...)."""


class ImageCountMismatchError(PromptError):
    """The number of `<image>` tags and the number of images given disagree."""


class PromptTooLongError(PromptError):
    """A prompt (plus max_tokens) does not fit the model context or the KV cache."""


class SamplingParamsError(XGenMMError, ValueError):
    """An invalid or unknown sampling option. `field` names the option (a `SamplingParams` field or an OpenAI
    request field, e.g. "temperature", "response_format"); None when the error is not about one field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # keep `field` across pickling (process pools, multiprocessing queues)
        return (type(self), (str(self), self.field))


class AttentionBackendUnavailableError(XGenMMError, RuntimeError):
    """The requested attention backend cannot run here (e.g. Triton on a CPU without TRITON_INTERPRET=1)."""


class RequestAbortedError(XGenMMError):
    """The request was aborted (cancelled by its caller or the engine shut down)."""


class EngineDeadError(XGenMMError):
    """The engine loop stopped because of an unexpected internal error."""


class SchemaTooComplexError(PromptError):
    """A JSON schema (response_format or tool parameters) needs more work to bound than a request may buy: too many
    nodes once its `$ref`s are followed, or `$ref` chains too deep. `field` names the request field it came from."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self):
        return (type(self), (str(self), self.field))


class QuantizationError(ConfigError):
    """An unknown `quantization` method, or one this device / layer cannot run (the message names the allowed ones)."""


__all__ = [
    "XGenMMError",
    "CheckpointError",
    "ModelNotFoundError",
    "ConfigError",
    "DeviceError",
    "DtypeError",
    "QuantizationError",
    "ImageError",
    "ImageTooLargeError",
    "ImageSourceNotAllowedError",
    "PromptError",
    "ImageCountMismatchError",
    "PromptTooLongError",
    "SchemaTooComplexError",
    "SamplingParamsError",
    "AttentionBackendUnavailableError",
    "RequestAbortedError",
    "EngineDeadError",
]
