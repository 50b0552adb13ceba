"""Reading tool calls out of a reply: `parse_tool_calls` for a whole reply, `ToolCallStreamParser` incrementally,
arguments coerced to the tool's JSON-schema types."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .choice import normalize_tools
from .format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from .types import InvalidToolCall, ParsedReply, ToolCall, ToolStreamEvent, new_tool_call_id

__all__ = ["parse_tool_calls", "ToolCallStreamParser", "coerce_arguments"]


_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_NAME_RE = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _tool_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    if tools is None:
        return None
    return {t["function"]["name"]: t["function"]["parameters"] for t in normalize_tools(tools)}


def _loads_lenient(text: str) -> Any:
    body = text.strip()
    fence = _FENCE_RE.match(body)
    if fence:
        body = fence.group(1)
    return json.loads(body)


def _parse_call_body(
    body: str, schemas: dict[str, dict[str, Any]] | None, make_id: Callable[[], str]
) -> ToolCall | InvalidToolCall:
    call_id = make_id()
    try:
        obj = _loads_lenient(body)
    except ValueError as exc:
        match = _NAME_RE.search(body)
        return InvalidToolCall(call_id, match.group(1) if match else None, body.strip(), f"invalid JSON: {exc}")
    if isinstance(obj, Mapping) and isinstance(obj.get("function"), Mapping):  # OpenAI shape
        obj = obj["function"]
    if not isinstance(obj, Mapping):
        return InvalidToolCall(call_id, None, body.strip(), "a tool call must be a JSON object")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return InvalidToolCall(call_id, None, body.strip(), "the tool call has no string 'name'")
    arguments = obj.get("arguments", obj.get("parameters", obj.get("args", {})))
    raw_arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            return InvalidToolCall(call_id, name, raw_arguments, f"arguments are not valid JSON: {exc}")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        return InvalidToolCall(call_id, name, raw_arguments, "arguments must be a JSON object")
    if schemas is not None:
        if name not in schemas:
            return InvalidToolCall(call_id, name, raw_arguments, f"unknown tool {name!r}; known tools: {sorted(schemas)}")
        arguments = coerce_arguments(arguments, schemas[name])
    return ToolCall(call_id, name, dict(arguments))


def parse_tool_calls(
    text: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    id_factory: Callable[[], str] = new_tool_call_id,
) -> ParsedReply:
    """Split a reply into prose and tool calls.

    Every `<tool_call>...</tool_call>` block becomes a `ToolCall` (or an `InvalidToolCall` saying why not); a block
    left open at the end (the reply ran out of tokens or the model stopped early) is parsed too. With `tools`, names
    are checked against them and arguments coerced to their schema types ("3" -> 3 for an integer), and a reply that
    is nothing but one JSON object `{"name": <a tool>, "arguments": {...}}` (no tags; weak models do this) counts as
    a call as well. `content` is the remaining text, stripped.
    """
    schemas = _tool_schemas(tools)
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    prose: list[str] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start < 0:
            prose.append(text[pos:])
            break
        prose.append(text[pos:start])
        body_start = start + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_start)
        body = text[body_start:] if end < 0 else text[body_start:end]
        result = _parse_call_body(body, schemas, id_factory)
        if end < 0 and isinstance(result, InvalidToolCall):
            result = InvalidToolCall(result.id, result.name, result.arguments,
                                     f"unterminated <tool_call> block ({result.error})")
        (calls if isinstance(result, ToolCall) else invalid).append(result)
        if end < 0:
            break
        pos = end + len(TOOL_CALL_CLOSE)
    content = "".join(prose).strip()
    if not calls and not invalid and schemas:
        bare = _bare_json_call(content, schemas, id_factory)
        if bare is not None:
            return ParsedReply("", [bare], [])
    return ParsedReply(content, calls, invalid)


def _bare_json_call(
    text: str, schemas: dict[str, dict[str, Any]], make_id: Callable[[], str]
) -> ToolCall | None:
    stripped = text.strip()
    if not stripped.startswith(("{", "```")):
        return None
    try:
        obj = _loads_lenient(stripped)
    except ValueError:
        return None
    if isinstance(obj, Mapping) and isinstance(obj.get("function"), Mapping):
        obj = obj["function"]
    if not isinstance(obj, Mapping) or obj.get("name") not in schemas or not (
        "arguments" in obj or "parameters" in obj or set(obj) == {"name"}
    ):
        return None
    result = _parse_call_body(json.dumps(obj), schemas, make_id)
    return result if isinstance(result, ToolCall) else None


class ToolCallStreamParser:
    """Incremental `parse_tool_calls`: feed text deltas, get prose deltas and finished calls as soon as they are known.

    Prose streams through at once, except a tail that might be the start of `<tool_call>` (held back until the next
    delta settles it). A call is reported when its `</tool_call>` arrives. With `tools`, a reply whose first
    non-blank character is `{` is held until `finish()` to see whether it is a bare JSON call.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None, *,
                 id_factory: Callable[[], str] = new_tool_call_id) -> None:
        self._schemas = _tool_schemas(tools)
        self._make_id = id_factory
        self._buffer = ""
        self._in_call = False
        self._seen_text = False  # any non-blank prose emitted (so a later "{" is not a bare call)
        self._holding_bare = False
        self._saw_call = False

    def feed(self, delta: str) -> list[ToolStreamEvent]:
        self._buffer += delta
        events: list[ToolStreamEvent] = []
        while True:
            if self._holding_bare:
                if TOOL_CALL_OPEN in self._buffer:  # not a bare call after all: continue as tagged text
                    self._holding_bare = False
                    continue
                return events
            if self._in_call:
                end = self._buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return events
                events.append(self._call_event(self._buffer[:end], terminated=True))
                self._buffer = self._buffer[end + len(TOOL_CALL_CLOSE):]
                self._in_call = False
                continue
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start >= 0:
                self._emit_text(self._buffer[:start], events)
                self._buffer = self._buffer[start + len(TOOL_CALL_OPEN):]
                self._in_call = True
                self._saw_call = True
                continue
            if (self._schemas and not self._seen_text and not self._saw_call
                    and self._buffer.lstrip().startswith(("{", "`"))):
                self._holding_bare = True
                return events
            keep = _partial_tag_suffix(self._buffer, TOOL_CALL_OPEN)
            if not self._seen_text and not self._buffer[: len(self._buffer) - keep].strip():
                return events  # only whitespace so far: wait, the reply may still be a bare JSON call
            self._emit_text(self._buffer[: len(self._buffer) - keep], events)
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return events

    def finish(self) -> list[ToolStreamEvent]:
        """Flush at the end of the reply: held text, an unterminated call, or a held bare JSON call."""
        events: list[ToolStreamEvent] = []
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            self._in_call = False
            events.append(self._call_event(rest, terminated=False))
        elif self._holding_bare or not self._seen_text:
            self._holding_bare = False
            bare = _bare_json_call(rest, self._schemas, self._make_id) if self._schemas and not self._saw_call else None
            if bare is not None:
                events.append(ToolStreamEvent(tool_call=bare))
            elif rest:
                self._emit_text(rest, events, force=True)
        elif rest:
            self._emit_text(rest, events, force=True)
        return events

    def _emit_text(self, text: str, events: list[ToolStreamEvent], force: bool = False) -> None:
        if not text:
            return
        if text.strip():
            self._seen_text = True
        elif not force and not self._seen_text:
            return
        events.append(ToolStreamEvent(text=text))

    def _call_event(self, body: str, terminated: bool) -> ToolStreamEvent:
        result = _parse_call_body(body, self._schemas, self._make_id)
        if isinstance(result, ToolCall):
            return ToolStreamEvent(tool_call=result)
        if not terminated:
            result = InvalidToolCall(result.id, result.name, result.arguments,
                                     f"unterminated <tool_call> block ({result.error})")
        return ToolStreamEvent(invalid=result)


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Argument coercion
# ---------------------------------------------------------------------------------------------------------------


def _schema_types(schema: Mapping[str, Any]) -> list[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return [t for sub in schema[key] if isinstance(sub, Mapping) for t in _schema_types(sub)]
    return []


def _coerce_value(value: Any, schema: Mapping[str, Any]) -> Any:
    types = _schema_types(schema)
    if not types or isinstance(value, bool) and "boolean" in types:
        return value
    if isinstance(value, str) and "string" not in types:
        text = value.strip()
        if "integer" in types and re.fullmatch(r"[-+]?\d+", text):
            return int(text)
        if "number" in types:
            try:
                number = float(text)
            except ValueError:
                pass
            else:
                return int(number) if number.is_integer() and "integer" in types else number
        if "boolean" in types and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if "null" in types and text.lower() in ("null", "none"):
            return None
    if isinstance(value, float) and "integer" in types and "number" not in types and value.is_integer():
        return int(value)
    if isinstance(value, Mapping) and "object" in types and isinstance(schema.get("properties"), Mapping):
        return coerce_arguments(value, schema)
    if isinstance(value, list) and "array" in types and isinstance(schema.get("items"), Mapping):
        return [_coerce_value(v, schema["items"]) for v in value]
    return value


def coerce_arguments(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Fix the types weak models get wrong ("3" for an integer, "true" for a boolean) following the JSON schema's
    declared property types; values that cannot be coerced are left as they are."""
    properties = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(properties, Mapping):
        return dict(arguments)
    out = {}
    for key, value in arguments.items():
        sub = properties.get(key)
        out[key] = _coerce_value(value, sub) if isinstance(sub, Mapping) else value
    return out
