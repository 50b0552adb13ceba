"""LangChain integration for xGen-MM (BLIP-3): a chat model, an image loader for RAG and an image QA tool."""

from importlib import metadata

from .chat_models import ChatXGenMM
from .document_loaders import XGenMMImageLoader
from .image_qa_tool import XGenMMImageQATool

try:
    __version__ = metadata.version("xgenmm")
except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
    __version__ = "0.0.0"

__all__ = ["ChatXGenMM", "XGenMMImageLoader", "XGenMMImageQATool", "__version__"]
