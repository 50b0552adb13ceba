"""LlamaIndex integration for xGen-MM (BLIP-3): the `XGenMM` multimodal function-calling LLM and the
`XGenMMImageReader` captioning reader for multimodal RAG, and `image_qa_tool` for agents. Also importable as `llama_index.llms.xgenmm` and
`llama_index.readers.xgenmm`."""

from importlib import metadata as _metadata

from .base import DEFAULT_CONTEXT_WINDOW, XGenMM
from .image_qa_tool import image_qa_tool
from .messages import to_image_block
from .reader import READER_PROMPTS, XGenMMImageReader

try:
    __version__ = _metadata.version("xgenmm")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__", "XGenMM", "image_qa_tool", "XGenMMImageReader", "READER_PROMPTS", "DEFAULT_CONTEXT_WINDOW", "to_image_block"]
