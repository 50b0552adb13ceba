"""Grammar-constrained ReAct steps whose every reply fits the request's `max_tokens`.

ReAct agents (LlamaIndex's `ReActAgent`, ...) read the model's text: "Thought: ...\\nAction: <tool>\\nAction Input:
{...}" or "Thought: ...\\nAnswer: ...". A small model drifts from that format, so the grammar here allows only that
format, with arguments matching the tool's JSON schema. A grammar fixes the shape of a reply, not its length: if the
thought or the arguments may be longer than `max_tokens`, the reply is cut mid-argument and never parses, and the
agent loops until it gives up. `react_limits` therefore derives the thought, argument and answer limits from
`max_tokens` (worst case: one token per byte of forced text and of arguments, one per thought character, which is
printable ASCII so one byte), so that a thought plus an action always fits. An answer may be cut by `max_tokens` only
where it holds non-ASCII characters; a cut answer still parses ("Answer: ..." runs to the end of the reply).

Front ends translate their own tool and message types; this module takes OpenAI tool dicts and (role, text) pairs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import SamplingParamsError
from ..structured.schema_budget import BOUNDED_JSON_OPTIONS, bound_json_schema, smallest_json_budget
from .choice import normalize_tools
from .grammar import strict_schema

__all__ = ["ReActLimits", "react_limits", "react_grammar", "react_step", "observations_since_user",
           "OBSERVATION_PREFIX", "DEFAULT_MAX_THOUGHT_CHARS", "DEFAULT_MAX_ANSWER_CHARS"]

OBSERVATION_PREFIX = "Observation:"
DEFAULT_MAX_THOUGHT_CHARS = 300
DEFAULT_MAX_ANSWER_CHARS = 2000
_THOUGHT = "Thought: "
_ACTION = "Action: "
_ACTION_INPUT = "\nAction Input: "
_ANSWER = "Answer: "
_END_OF_TURN = 1  # the end-of-turn token after the grammar completes counts against max_tokens
_THOUGHT_SHARE = 3  # a thought gets at most a third of what the arguments leave


@dataclass(frozen=True)
class ReActLimits:
    """Per-step limits: thought and answer in characters, tool arguments in tokens (None = unbounded)."""

    max_thought_chars: int = DEFAULT_MAX_THOUGHT_CHARS
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS
    max_argument_tokens: Optional[int] = None


def _action_overhead(name: str) -> int:
    """Worst-case tokens of everything in an action step except the thought and the arguments."""
    return len((_THOUGHT + "\n" + _ACTION + name + _ACTION_INPUT).encode()) + _END_OF_TURN


def react_limits(tools: Sequence[Mapping[str, Any]], max_tokens: int, *,
                 max_thought_chars: Optional[int] = None, max_answer_chars: Optional[int] = None,
                 max_argument_tokens: Optional[int] = None) -> ReActLimits:
    """Limits such that any step the grammar allows fits `max_tokens`. Limits given explicitly are caps (they can
    only make the derived ones smaller). Raises `SamplingParamsError` naming the smallest `max_tokens` that works when
    even a one-character thought plus the smallest arguments of some tool cannot fit."""
    if max_tokens is None or max_tokens <= 0:
        raise SamplingParamsError(f"max_tokens must be a positive integer for a ReAct step, got {max_tokens!r}",
                                  field="max_tokens")
    thought_cap = DEFAULT_MAX_THOUGHT_CHARS if max_thought_chars is None else max_thought_chars
    answer_cap = DEFAULT_MAX_ANSWER_CHARS if max_answer_chars is None else max_answer_chars
    if thought_cap < 1 or answer_cap < 1:
        raise SamplingParamsError("max_thought_chars and max_answer_chars must be at least 1",
                                  field="max_thought_chars" if thought_cap < 1 else "max_answer_chars")
    normalized = normalize_tools(tools)
    # The tool whose action leaves the least room decides the thought (the grammar has one THOUGHT rule).
    room = max_tokens - 1  # what a one-character thought leaves for the worst tool's action
    needed = 0
    for tool in normalized:
        fn = tool["function"]
        smallest = smallest_json_budget(_argument_schema(fn["parameters"]))
        room = min(room, max_tokens - _action_overhead(fn["name"]) - smallest)
        needed = max(needed, _action_overhead(fn["name"]) + smallest + 1)
    if normalized and room < 1:
        raise SamplingParamsError(
            f"max_tokens={max_tokens} is too small for a ReAct step that calls a tool: the longest tool name and the "
            f"smallest arguments need max_tokens >= {needed}; raise max_tokens (or shorten the tool's name/schema)",
            field="max_tokens")
    thought = max(1, min(thought_cap, room // _THOUGHT_SHARE if normalized else max_tokens))
    arguments = None
    if normalized:
        arguments = min(max_tokens - _action_overhead(fn["name"]) - thought for fn in (t["function"] for t in normalized))
        if max_argument_tokens is not None:
            arguments = min(arguments, max_argument_tokens)
    answer_room = max_tokens - len((_THOUGHT + "\n" + _ANSWER).encode()) - thought - _END_OF_TURN
    if answer_room < 1:
        raise SamplingParamsError(f"max_tokens={max_tokens} is too small for a ReAct answer; raise max_tokens",
                                  field="max_tokens")
    return ReActLimits(thought, min(answer_cap, answer_room), arguments)


def _argument_schema(parameters: Mapping[str, Any]) -> dict[str, Any]:
    schema = strict_schema(parameters)
    schema.setdefault("type", "object")
    return schema


def react_grammar(tools: Sequence[Mapping[str, Any]], *, allow_action: bool = True, allow_answer: bool = True,
                  limits: ReActLimits = ReActLimits()) -> str:
    """A Lark grammar (llguidance) for one ReAct step.

    Thoughts are one line of printable ASCII without ':' (so they cannot be mistaken for an "Action:" / "Answer:"
    keyword, and each character is at most one token); tool names must contain no spaces or parentheses (the ReAct
    parsers' rule); arguments are compact JSON matching the tool's schema, with `additionalProperties: false` where the
    schema leaves it open, bounded to `limits.max_argument_tokens` (`xgenmm.structured.schema_budget`).
    """
    if not (allow_action or allow_answer):
        raise SamplingParamsError("a ReAct step must allow an action, an answer or both", field="allow_action")
    normalized = normalize_tools(tools) if allow_action else []
    if allow_action and not normalized:
        raise SamplingParamsError("a ReAct step that allows an action needs at least one tool", field="tools")
    branches: list[str] = []
    rules: list[str] = []
    if allow_action:
        calls = []
        for i, tool in enumerate(normalized):
            name = tool["function"]["name"]
            if any(c in name for c in " ()\n"):
                raise SamplingParamsError(f"tool name {name!r} cannot be used with ReAct (spaces or parentheses)",
                                          field="tools")
            schema = _argument_schema(tool["function"]["parameters"])
            if limits.max_argument_tokens is not None:
                schema = bound_json_schema(schema, limits.max_argument_tokens, reserve_tokens=0).schema
            else:
                schema["x-guidance"] = dict(BOUNDED_JSON_OPTIONS)
            rules.append(f"call_{i}: {json.dumps(name + _ACTION_INPUT)} args_{i}")
            rules.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
            calls.append(f"call_{i}")
        rules.append(f"action: {json.dumps(_ACTION)} (" + " | ".join(calls) + ")")
        branches.append("action")
    if allow_answer:
        rules.append(f"answer: {json.dumps(_ANSWER)} ANSWER")
        rules.append(f"ANSWER: /[^\\n]{{1,{int(limits.max_answer_chars)}}}/")
        branches.append("answer")
    head = [
        "%llguidance {}",
        f"start: {json.dumps(_THOUGHT)} THOUGHT \"\\n\" "
        + ("(" + " | ".join(branches) + ")" if len(branches) > 1 else branches[0]),
        f"THOUGHT: /[ -9;-~]{{1,{int(limits.max_thought_chars)}}}/",
    ]
    return "\n".join(head + rules) + "\n"


def observations_since_user(messages: Iterable[tuple[str, str]]) -> int:
    """How many tool observations follow the user's last real message, given (role, text) pairs oldest first
    (agents send observations as tool messages or as user messages starting with "Observation:")."""
    count = 0
    for role, text in reversed(list(messages)):
        if role == "tool" or (role == "user" and (text or "").lstrip().startswith(OBSERVATION_PREFIX)):
            count += 1
        elif role == "user":
            break
    return count


def react_step(observations: int, has_tools: bool, min_tool_calls: int,
               max_tool_calls: Optional[int]) -> tuple[bool, bool]:
    """(allow_action, allow_answer) for the next step: an action until `min_tool_calls` observations, an answer from
    `max_tool_calls` on, either in between."""
    allow_action = has_tools and (max_tool_calls is None or observations < max_tool_calls)
    allow_answer = observations >= min_tool_calls or not has_tools
    return allow_action, allow_answer
