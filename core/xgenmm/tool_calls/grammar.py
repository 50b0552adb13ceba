"""The llguidance grammar that makes the engine write only well-formed tool calls whose arguments match the tool's
JSON schema (bounded to the request's token budget)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PromptError, SchemaTooComplexError
from ..sampling_params import StructuredOutputsParams
from ..structured.schema_budget import BOUNDED_JSON_OPTIONS, bound_json_schema
from .choice import normalize_tools, resolve_tool_choice
from .format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, render_tool_call

__all__ = ["strict_schema", "tool_call_structured_outputs"]


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a JSON schema where every object that lists `properties` and says nothing about
    `additionalProperties` gets `additionalProperties: false` (OpenAI strict mode's rule). Under a grammar this keeps
    a weak model from inventing keys forever; declared properties and required lists are unchanged."""
    out = copy.deepcopy(dict(schema))

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(out)
    return out


def _call_schema(tool: Mapping[str, Any], strict: bool, max_tokens: int | None) -> dict[str, Any]:
    fn = tool["function"]
    params = fn["parameters"]
    params = strict_schema(params) if strict else copy.deepcopy(dict(params))
    params.setdefault("type", "object")
    if max_tokens is not None:
        # Everything around the arguments: tags, newlines, the name envelope and the end-of-turn token.
        envelope = len(render_tool_call(fn["name"], {}).encode()) - 2 + 1
        try:
            params = bound_json_schema(params, max_tokens, reserve_tokens=envelope, x_guidance=False).schema
        except SchemaTooComplexError as exc:
            raise SchemaTooComplexError(f"tool {fn['name']!r} parameters: {exc}", field="tools") from None
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _hoist_defs(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    """Move `$defs` / `definitions` of each parameters schema to the root (refs are `#/...` from the root)."""
    root_defs: dict[str, Any] = {}
    for schema in schemas:
        params = schema["properties"]["arguments"]
        for key in ("$defs", "definitions"):
            defs = params.pop(key, None)
            if isinstance(defs, Mapping):
                for name, value in defs.items():
                    if name in root_defs and root_defs[name] != value:
                        raise PromptError(f"tools define conflicting schemas named {name!r} in {key}")
                    root_defs[name] = value
                if key == "definitions":
                    _rewrite_refs(params, "#/definitions/", "#/$defs/")
    return root_defs


def _rewrite_refs(node: Any, old: str, new: str) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(old):
            node["$ref"] = new + ref[len(old):]
        for value in node.values():
            _rewrite_refs(value, old, new)
    elif isinstance(node, list):
        for value in node:
            _rewrite_refs(value, old, new)


def tool_call_structured_outputs(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any = "required",
    *,
    parallel_tool_calls: bool = False,
    strict: bool = True,
    constrain_auto: bool = True,
    max_tokens: int | None = None,
    max_parallel_calls: int = 4,
) -> StructuredOutputsParams | None:
    """The grammar that makes the engine write only valid tool calls, or None when nothing is constrained.

    * "required" / "any" / a tool name: the reply is one `<tool_call>` block (several, one per line, with
      `parallel_tool_calls`) whose JSON is `{"name": <tool>, "arguments": <matching the tool's parameters>}`.
    * "auto" (with `constrain_auto`): the reply is either prose that does not begin with `<`, or such calls, so a
      model that decides to call a tool cannot get the call wrong.
    * "none", or no tools: None.

    JSON inside calls is compact-ish, spelled with `json.dumps`' default separators (as history renders it). With
    `strict` (default) objects get `additionalProperties: false` unless their schema says otherwise. With
    `max_tokens` (the request's budget) the argument schemas are bounded (`xgenmm.structured.schema_budget`) so that a complete
    call always fits: even a model that never closes a string by itself ends with a valid call. Parallel calls are
    then at most `max_parallel_calls`, each with its share of the budget.
    """
    normalized = normalize_tools(tools)
    mode, forced = resolve_tool_choice(tool_choice, normalized)
    if mode == "none" or (mode == "auto" and not constrain_auto):
        return None
    chosen = [t for t in normalized if forced is None or t["function"]["name"] == forced]
    call_budget = None
    if max_tokens is not None:
        blank = 4 if mode == "auto" else 0
        call_budget = (max_tokens - blank) // (max_parallel_calls if parallel_tool_calls else 1)
    variants = [_call_schema(t, strict, call_budget) for t in chosen]
    defs = _hoist_defs(variants)
    body: dict[str, Any] = {"x-guidance": dict(BOUNDED_JSON_OPTIONS)}
    if len(variants) == 1:
        body.update(variants[0])
    else:
        body["anyOf"] = variants
    if defs:
        body["$defs"] = defs
    lines = [
        "%llguidance {}",
        (f'calls: call ("\\n" call){{0,{max_parallel_calls - 1}}}' if max_tokens is not None else 'calls: call ("\\n" call)*')
        if parallel_tool_calls else "calls: call",
        f'call: "{TOOL_CALL_OPEN}\\n" call_json "\\n{TOOL_CALL_CLOSE}"',
        "call_json: %json " + json.dumps(body, ensure_ascii=False),
    ]
    if mode == "required":
        lines.insert(1, "start: calls")
    else:
        # Prose may not start with "<" (after optional blanks), so a reply that opens a tag is held to the grammar.
        lines.insert(1, "start: TEXT | BLANK? calls | BLANK?")
        lines.append(r"TEXT: /[ \t\r\n]*[^<\s](.|\n)*/")
        lines.append(r"BLANK: /[ \t\r\n]{1,4}/")
    return StructuredOutputsParams(grammar="\n".join(lines) + "\n")
