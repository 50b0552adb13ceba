"""Deprecated: `langchain_xgenmm.tools` moved to `langchain_xgenmm.image_qa_tool` (alias removed in the next release)."""

import warnings

from .image_qa_tool import *  # noqa: F401,F403
from .image_qa_tool import __all__  # noqa: F401

warnings.warn("langchain_xgenmm.tools moved to langchain_xgenmm.image_qa_tool; the old import path will be removed in "
              "the next release", DeprecationWarning, stacklevel=2)
