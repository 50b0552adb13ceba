"""Grammar-constrained ReAct for `ReActAgent`: every reply parses, and tool use can be bounded.

`ReActAgent` reads the model's text ("Thought: ...\\nAction: <tool>\\nAction Input: {...}" or "Thought: ...\\nAnswer:
..."). A small model often drifts from that format, so the agent gives up or loops. `ReActConstraint` plugs into
`XGenMM(structured_outputs=...)` and chooses a grammar for each call: the reply is a thought plus either an action
on one of the tools, with arguments matching the tool's JSON schema, or an answer. `min_tool_calls` /
`max_tool_calls` (counted as observations since the user's last message) decide which of the two is allowed, so
"use a tool first" and "answer after N tool results" can be enforced. The model still writes the thought, picks the
tool (when there are several), fills the arguments and writes the answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from llama_index.core.base.llms.types import ChatMessage, MessageRole

from xgenmm.sampling_params import StructuredOutputsParams
from xgenmm.structured.schema_budget import BOUNDED_JSON_OPTIONS, bound_json_schema
from xgenmm.tool_calls import normalize_tools, strict_schema

__all__ = ["react_grammar", "ReActConstraint", "observations_since_user"]

_OBSERVATION_PREFIX = "Observation:"


def _tool_dicts(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI tool dicts from LlamaIndex tools (anything with `.metadata.to_openai_tool`) or OpenAI dicts."""
    out = []
    for tool in tools:
        metadata = getattr(tool, "metadata", None)
        out.append(metadata.to_openai_tool(skip_length_check=True) if metadata is not None else tool)
    return normalize_tools(out)


def react_grammar(tools: Sequence[Any], *, allow_action: bool = True, allow_answer: bool = True,
                  max_thought_chars: int = 300, max_answer_chars: int = 2000,
                  max_argument_tokens: Optional[int] = None) -> str:
    """A Lark grammar (llguidance) for one ReAct step.

    Thoughts are one line without ':' (so they cannot be mistaken for an "Action:" / "Answer:" keyword); tool names
    must contain no spaces or parentheses (ReActOutputParser's rule); arguments are compact JSON matching the tool's
    schema, with `additionalProperties: false` where the schema leaves it open. With `max_argument_tokens` the
    argument schema is bounded (`xgenmm.structured.schema_budget`) so the arguments always fit that many tokens.
    """
    if not (allow_action or allow_answer):
        raise ValueError("a ReAct step must allow an action, an answer or both")
    normalized = _tool_dicts(tools) if allow_action else []
    if allow_action and not normalized:
        raise ValueError("allow_action needs at least one tool")
    branches: list[str] = []
    rules: list[str] = []
    if allow_action:
        calls = []
        for i, tool in enumerate(normalized):
            name = tool["function"]["name"]
            if any(c in name for c in " ()\n"):
                raise ValueError(f"tool name {name!r} cannot be used with ReAct (spaces or parentheses)")
            schema = strict_schema(tool["function"]["parameters"])
            schema.setdefault("type", "object")
            if max_argument_tokens is not None:
                schema = bound_json_schema(schema, max_argument_tokens).schema
            else:
                schema["x-guidance"] = dict(BOUNDED_JSON_OPTIONS)
            rules.append(f"call_{i}: {json.dumps(name + chr(10) + 'Action Input: ')} args_{i}")
            rules.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
            calls.append(f"call_{i}")
        rules.append('action: "Action: " (' + " | ".join(calls) + ")")
        branches.append("action")
    if allow_answer:
        rules.append('answer: "Answer: " ANSWER')
        rules.append(f"ANSWER: /[^\\n]{{1,{int(max_answer_chars)}}}/")
        branches.append("answer")
    head = [
        "%llguidance {}",
        'start: "Thought: " THOUGHT "\\n" ' + ("(" + " | ".join(branches) + ")" if len(branches) > 1 else branches[0]),
        f"THOUGHT: /[^\\n:]{{1,{int(max_thought_chars)}}}/",
    ]
    return "\n".join(head + rules) + "\n"


def observations_since_user(messages: Sequence[ChatMessage]) -> int:
    """How many tool observations follow the user's last real message (ReActAgent sends them as user messages
    starting with "Observation:", or as tool messages)."""
    count = 0
    for message in reversed(messages):
        text = (message.content or "").lstrip()
        if message.role == MessageRole.TOOL or (message.role == MessageRole.USER and text.startswith(_OBSERVATION_PREFIX)):
            count += 1
        elif message.role == MessageRole.USER:
            break
    return count


class ReActConstraint:
    """`XGenMM(structured_outputs=ReActConstraint(tools, ...))`: a ReAct-format grammar chosen per call.

    Before `min_tool_calls` observations only an action is allowed; from `max_tool_calls` on only an answer; in
    between, either. Calls that carry no ReAct system prompt (e.g. other uses of the same LLM) are not constrained
    unless `always=True`.
    """

    def __init__(self, tools: Sequence[Any], *, min_tool_calls: int = 0, max_tool_calls: Optional[int] = None,
                 always: bool = False, max_thought_chars: int = 300, max_answer_chars: int = 2000,
                 max_argument_tokens: Optional[int] = None) -> None:
        if max_tool_calls is not None and max_tool_calls < min_tool_calls:
            raise ValueError(f"max_tool_calls ({max_tool_calls}) < min_tool_calls ({min_tool_calls})")
        self.tools = list(tools)
        self.min_tool_calls = min_tool_calls
        self.max_tool_calls = max_tool_calls
        self.always = always
        self._limits = {"max_thought_chars": max_thought_chars, "max_answer_chars": max_answer_chars,
                        "max_argument_tokens": max_argument_tokens}

    def __call__(self, messages: Sequence[ChatMessage]) -> Optional[StructuredOutputsParams]:
        if not self.always and not _looks_like_react(messages):
            return None
        seen = observations_since_user(messages)
        allow_action = bool(self.tools) and (self.max_tool_calls is None or seen < self.max_tool_calls)
        allow_answer = seen >= self.min_tool_calls or not self.tools
        return StructuredOutputsParams(
            grammar=react_grammar(self.tools, allow_action=allow_action, allow_answer=allow_answer, **self._limits)
        )


def _looks_like_react(messages: Sequence[Mapping[str, Any]] | Sequence[ChatMessage]) -> bool:
    for message in messages:
        if message.role == MessageRole.SYSTEM and "Action Input:" in (message.content or ""):
            return True
    return False
