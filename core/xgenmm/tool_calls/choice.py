"""Which tools a request offers and which it forces: OpenAI tool lists and `tool_choice` in every accepted form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PromptError

__all__ = ["NormalizedTools", "normalize_tools", "tool_names", "resolve_tool_choice"]


class NormalizedTools(list):
    """Tools `normalize_tools` already checked: passed again (to the tool-choice resolver, the grammar builder, the
    prompt renderer, the reply parser), they are not validated again."""


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI function tools `{"type": "function", "function": {"name", "description", "parameters"}}`.

    Also accepts the bare function object `{"name", "description", "parameters"}`. Raises `PromptError` naming the
    tool index for anything else. A repeated name keeps its first definition (a call names one tool). The result is
    a `NormalizedTools`, returned as it is when given back, so a request's tools are validated once.
    """
    if isinstance(tools, NormalizedTools):
        return tools
    out = NormalizedTools()
    seen: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or ()):
        if not isinstance(tool, Mapping):
            raise PromptError(f"tool {i}: must be a dict (OpenAI function tool), got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise PromptError(f"tool {i}: only function tools are supported, got type {tool.get('type')!r}")
        fn = tool.get("function", tool if "name" in tool else None)
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise PromptError(f"tool {i}: needs a function with a non-empty string 'name'")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise PromptError(f"tool {i} ({fn['name']}): 'parameters' must be a JSON schema object")
        function: dict[str, Any] = {"name": fn["name"]}
        if fn.get("description"):
            function["description"] = str(fn["description"])
        function["parameters"] = dict(params)
        if fn["name"] in seen:
            continue  # a name given twice (e.g. a pydantic class and its JSON schema): the first definition wins
        seen[fn["name"]] = function
        out.append({"type": "function", "function": function})
    return out


def tool_names(tools: Sequence[Mapping[str, Any]] | None) -> list[str]:
    return [t["function"]["name"] for t in normalize_tools(tools)]


def resolve_tool_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]] | None) -> tuple[str, str | None]:
    """-> (mode, forced tool name): mode is "none", "auto" or "required" (a forced name implies "required").

    Accepts None / "auto", "none", "required" / "any" / True, a tool name, and the OpenAI / LangChain dict forms
    `{"type": "function", "function": {"name": ...}}` and `{"type": "tool", "name": ...}`.
    """
    names = tool_names(tools)
    if tool_choice is None or tool_choice == "auto" or tool_choice is False:
        return ("auto" if names else "none"), None
    if tool_choice == "none":
        return "none", None
    if tool_choice in ("required", "any") or tool_choice is True:
        if not names:
            raise PromptError(f"tool_choice={tool_choice!r} needs at least one tool")
        return "required", None
    name = None
    if isinstance(tool_choice, str):
        name = tool_choice
    elif isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else tool_choice.get("name")
    if not isinstance(name, str):
        raise PromptError(f"unsupported tool_choice {tool_choice!r}")
    if name not in names:
        raise PromptError(f"tool_choice names the tool {name!r}, which is not among the tools {names}")
    return "required", name
