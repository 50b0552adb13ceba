"""Typed errors. Every user-facing failure is one of these, and names what is wrong."""


class XGenMMError(Exception):
    """Base class of every error raised by xgenmm."""


class CheckpointError(XGenMMError):
    """A checkpoint directory is missing, incomplete, corrupt or does not match the config."""


class ModelNotFoundError(CheckpointError):
    """A model id could not be resolved to a local directory (and could not be downloaded)."""


class ConfigError(XGenMMError, ValueError):
    """config.json (or a preprocessor / generation config) is invalid."""


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
    """An invalid or unknown sampling option."""


class RequestAbortedError(XGenMMError):
    """The request was aborted (cancelled by its caller or the engine shut down)."""


class EngineDeadError(XGenMMError):
    """The engine loop stopped because of an unexpected internal error."""


class QuantizationError(ConfigError):
    """An unknown `quantization` method, or one this device / layer cannot run (the message names the allowed ones)."""
