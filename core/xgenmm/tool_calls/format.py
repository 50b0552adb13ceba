"""The tool-call prompt format (Hermes / Qwen2.5 layout, see docs/tools.md): tools in the system turn, calls as
`<tool_call>{json}</tool_call>`, results as `<tool_response>` user turns. `HermesToolRenderer` plugs into
`xgenmm.chat.template.ChatRenderer`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PromptError
from ..special_tokens import END_TOKEN, USER_TOKEN
from .choice import normalize_tools

__all__ = [
    "TOOL_CALL_OPEN",
    "TOOL_CALL_CLOSE",
    "TOOL_RESPONSE_OPEN",
    "TOOL_RESPONSE_CLOSE",
    "JSON_ITEM_SEPARATOR",
    "JSON_KEY_SEPARATOR",
    "HermesToolRenderer",
    "render_tool_call",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response"
TOOL_RESPONSE_CLOSE = "</tool_response>"
# Arguments are written (in history) and constrained (in decoding) with json.dumps' default separators, so the model
# always sees and produces one spelling.
JSON_ITEM_SEPARATOR = ", "
JSON_KEY_SEPARATOR = ": "

_SYSTEM_TOOLS_TEMPLATE = """

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with the function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>
Function results come back to you inside <tool_response></tool_response> tags."""



def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(JSON_ITEM_SEPARATOR, JSON_KEY_SEPARATOR))


def render_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`: what the grammar makes the model write."""
    return f'{TOOL_CALL_OPEN}\n{_dumps({"name": name, "arguments": dict(arguments)})}\n{TOOL_CALL_CLOSE}'


def _escape_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


class HermesToolRenderer:
    """The `xgenmm.chat.template.ToolRenderer` of the core: Hermes-style tools in the system turn (see the module doc)."""

    def render_system_suffix(self, tools: Sequence[Mapping[str, Any]]) -> str:
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in normalize_tools(tools))
        return _SYSTEM_TOOLS_TEMPLATE.format(tools=lines)

    def render_assistant_tool_calls(self, tool_calls: Sequence[Mapping[str, Any]]) -> str:
        blocks = []
        for i, call in enumerate(tool_calls):
            name, arguments = _openai_call_parts(call, i)
            blocks.append(render_tool_call(name, arguments))
        # The chat renderer puts a line break between the assistant's text (if any) and this.
        return "\n".join(blocks)

    def tool_result_envelope(self, message: Mapping[str, Any]) -> tuple[str, str]:
        """(opening, closing) around a tool message's content; the chat renderer renders the content itself, so it
        can hold text and images."""
        attrs = ""
        name = message.get("name")
        if isinstance(name, str) and name:
            attrs += f' name="{_escape_attr(name)}"'
        if message.get("status") == "error":
            attrs += ' status="error"'
        return f"{USER_TOKEN}\n{TOOL_RESPONSE_OPEN}{attrs}>\n", f"\n{TOOL_RESPONSE_CLOSE}{END_TOKEN}\n"

    def render_tool_result(self, message: Mapping[str, Any]) -> str:
        """The whole turn for a text-only tool message (renderers without envelope support call this)."""
        head, tail = self.tool_result_envelope(message)
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, Sequence):
            texts = []
            for j, part in enumerate(content):
                if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    raise PromptError(f"tool result part {j}: only text parts can be rendered here")
            text = "\n".join(texts)
        elif content is None:
            text = ""
        else:
            text = _dumps(content)
        return head + text + tail


def _openai_call_parts(call: Mapping[str, Any], index: int) -> tuple[str, dict[str, Any]]:
    """(name, arguments dict) of an OpenAI `tool_calls` entry (arguments may be a JSON string)."""
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise PromptError(f"tool call {index}: needs function.name")
    arguments = fn.get("arguments", fn.get("args", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError) as exc:  # RecursionError: a string nested thousands of levels deep
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            raise PromptError(f"tool call {index} ({fn['name']}): arguments are not valid JSON: {reason}") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise PromptError(f"tool call {index} ({fn['name']}): arguments must be a JSON object")
    return fn["name"], dict(arguments)
