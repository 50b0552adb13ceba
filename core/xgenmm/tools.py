"""Tool (function) calling for xGen-MM: the prompt format, the reply parser and the grammar that forces a valid call.

Shared by every front end (core `LLM.chat(..., tools=...)`, LangChain, LlamaIndex, the OpenAI-compatible server), so
they all render, constrain and parse tool calls the same way. xGen-MM (Phi-3) was not trained on tools, so the format
is a choice; we use the widely known Hermes / Qwen2.5 layout, documented in `docs/tools.md`:

* Tools go at the end of the system turn, one OpenAI function schema (JSON) per line inside `<tools>...</tools>`,
  with an instruction to answer with `<tool_call>` blocks.
* An assistant tool call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (several are joined by
  "\\n"); text the assistant wrote before it stays in front.
* A tool result is a user turn (Phi-3 has no tool role): `<|user|>\\n<tool_response name="...">\\n{content}\\n
  </tool_response><|end|>\\n`; its content may hold images, rendered where they sit like any other content.

`parse_tool_calls` turns a reply into text + `ToolCall`s + `InvalidToolCall`s; `ToolCallStreamParser` does the same
incrementally for streaming; `tool_call_structured_outputs` builds the llguidance grammar that makes the engine emit
only well-formed calls whose arguments match the tool's JSON schema (for `tool_choice` "required" / "any" / a name).
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import PromptError
from .schema_budget import BOUNDED_JSON_OPTIONS, bound_json_schema
from .sampling_params import StructuredOutputsParams
from .special_tokens import END_TOKEN, USER_TOKEN

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


def new_tool_call_id() -> str:
    """A fresh OpenAI-style tool call id (`call_` + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Tool schemas
# ---------------------------------------------------------------------------------------------------------------


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI function tools `{"type": "function", "function": {"name", "description", "parameters"}}`.

    Also accepts the bare function object `{"name", "description", "parameters"}`. Raises `PromptError` naming the
    tool index for anything else. A repeated name keeps its first definition (a call names one tool).
    """
    out: list[dict[str, Any]] = []
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


# ---------------------------------------------------------------------------------------------------------------
# Rendering (plugs into xgenmm.prompts.ChatRenderer)
# ---------------------------------------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(JSON_ITEM_SEPARATOR, JSON_KEY_SEPARATOR))


def render_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`: what the grammar makes the model write."""
    return f'{TOOL_CALL_OPEN}\n{_dumps({"name": name, "arguments": dict(arguments)})}\n{TOOL_CALL_CLOSE}'


def _escape_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


class HermesToolRenderer:
    """The `xgenmm.prompts.ToolRenderer` of the core: Hermes-style tools in the system turn (see the module doc)."""

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
        except ValueError as exc:
            raise PromptError(f"tool call {index} ({fn['name']}): arguments are not valid JSON: {exc}") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise PromptError(f"tool call {index} ({fn['name']}): arguments must be a JSON object")
    return fn["name"], dict(arguments)


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# Grammar-constrained tool calls
# ---------------------------------------------------------------------------------------------------------------


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
        params = bound_json_schema(params, max_tokens, reserve_tokens=envelope, x_guidance=False).schema
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
    `max_tokens` (the request's budget) the argument schemas are bounded (`xgenmm.schema_budget`) so that a complete
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
