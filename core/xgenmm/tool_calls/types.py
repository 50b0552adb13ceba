"""Tool-call data: a parsed call, an unusable one, a reply split into prose and calls, a streaming event."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolCall", "InvalidToolCall", "ParsedReply", "ToolStreamEvent", "new_tool_call_id"]


def new_tool_call_id() -> str:
    """A fresh OpenAI-style tool call id (`call_` + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    """A well-formed call of a known tool. `arguments` is a dict (already coerced to the tool's schema types)."""

    id: str
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI chat-completions shape (`arguments` as a JSON string)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass(frozen=True)
class InvalidToolCall:
    """A `<tool_call>` block that could not be used: unparsable JSON, no name, an unknown tool, bad arguments."""

    id: str
    name: str | None
    arguments: str  # the raw text of the call (or of its arguments), for the caller to show or repair
    error: str


@dataclass(frozen=True)
class ParsedReply:
    """A model reply split into its prose (`content`) and its tool calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid: list[InvalidToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ToolStreamEvent:
    """One thing a `ToolCallStreamParser` recognised: new prose text, a complete tool call, or an invalid one."""

    text: str | None = None
    tool_call: ToolCall | None = None
    invalid: InvalidToolCall | None = None
