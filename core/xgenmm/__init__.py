"""xgenmm: fast, faithful inference for Salesforce xGen-MM (BLIP-3) on a paged, continuously batching engine."""

from .async_llm import AsyncLLM
from .checkpoint import DEFAULT_MODEL_ID, load_model, resolve_model_dir
from . import errors as _errors
from .errors import (
    AttentionBackendUnavailableError,
    CheckpointError,
    ConfigError,
    DeviceError,
    DtypeError,
    EngineDeadError,
    ImageCountMismatchError,
    ImageError,
    ImageSourceNotAllowedError,
    ImageTooLargeError,
    ModelNotFoundError,
    PromptError,
    PromptTooLongError,
    QuantizationError,
    RequestAbortedError,
    SamplingParamsError,
    SchemaTooComplexError,
    XGenMMError,
)
from .llm import LLM
from .multimodal.image_sources import ImageInputPolicy
from .placement import Placement, resolve_device, resolve_dtype, resolve_placement
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__version__ = "0.3.0"

__all__ = [
    "LLM",
    "AsyncLLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "RequestMetrics",
    "ImageInputPolicy",
    "DEFAULT_MODEL_ID",
    "load_model",
    "resolve_model_dir",
    "Placement",
    "resolve_placement",
    "resolve_device",
    "resolve_dtype",
    *_errors.__all__,
]
