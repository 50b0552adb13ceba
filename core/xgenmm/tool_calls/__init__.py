"""Tool (function) calling for xGen-MM, shared by every front end (`LLM.chat(..., tools=...)`, the server, the
LangChain and LlamaIndex adapters, through `xgenmm.chat.request`).

xGen-MM (Phi-3) was not trained on tools, so the format is a choice: the widely known Hermes / Qwen2.5 layout
(`format.py`, documented in docs/tools.md). `choice.py` normalises tool lists and `tool_choice`; `parser.py` reads
calls out of replies (whole or streamed); `grammar.py` builds the llguidance grammar that forces valid calls.
"""

from .choice import normalize_tools, resolve_tool_choice, tool_names
from .format import (
    JSON_ITEM_SEPARATOR,
    JSON_KEY_SEPARATOR,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    HermesToolRenderer,
    render_tool_call,
)
from .grammar import strict_schema, tool_call_structured_outputs
from .parser import ToolCallStreamParser, coerce_arguments, parse_tool_calls
from .types import InvalidToolCall, ParsedReply, ToolCall, ToolStreamEvent, new_tool_call_id

__all__ = [
    "TOOL_CALL_OPEN",
    "TOOL_CALL_CLOSE",
    "TOOL_RESPONSE_OPEN",
    "TOOL_RESPONSE_CLOSE",
    "JSON_ITEM_SEPARATOR",
    "JSON_KEY_SEPARATOR",
    "ToolCall",
    "InvalidToolCall",
    "ParsedReply",
    "ToolStreamEvent",
    "ToolCallStreamParser",
    "HermesToolRenderer",
    "normalize_tools",
    "tool_names",
    "resolve_tool_choice",
    "render_tool_call",
    "parse_tool_calls",
    "coerce_arguments",
    "strict_schema",
    "tool_call_structured_outputs",
    "new_tool_call_id",
]
