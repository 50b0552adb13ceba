"""`llama_index.llms.xgenmm`: the conventional LlamaIndex import path of `llamaindex_xgenmm.XGenMM`.

`llama_index/` and `llama_index/llms/` are namespace packages shared with llama-index-core: they must never get an
`__init__.py`, or they would shadow the installed `llama_index.core`.
"""

from llamaindex_xgenmm.base import XGenMM

__all__ = ["XGenMM"]
