"""LlamaIndex integration for xGen-MM (BLIP-3): the `XGenMM` multimodal function-calling LLM and the
`XGenMMImageReader` captioning reader for multimodal RAG. Also importable as `llama_index.llms.xgenmm` and
`llama_index.readers.xgenmm`."""

from .base import DEFAULT_CONTEXT_WINDOW, XGenMM
from .messages import to_image_block
from .reader import READER_PROMPTS, XGenMMImageReader

__all__ = ["XGenMM", "XGenMMImageReader", "READER_PROMPTS", "DEFAULT_CONTEXT_WINDOW", "to_image_block"]
