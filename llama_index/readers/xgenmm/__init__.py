"""`llama_index.readers.xgenmm`: the conventional LlamaIndex import path of `llamaindex_xgenmm.XGenMMImageReader`.

`llama_index/` and `llama_index/readers/` are namespace packages shared with llama-index-core: they must never get
an `__init__.py`, or they would shadow the installed `llama_index.core`.
"""

from llamaindex_xgenmm.reader import READER_PROMPTS, XGenMMImageReader

__all__ = ["XGenMMImageReader", "READER_PROMPTS"]
