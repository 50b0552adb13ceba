"""Grammar-constrained ReAct for LlamaIndex's `ReActAgent`: every reply parses, fits `max_tokens`, and tool use can be
bounded.

`ReActConstraint` plugs into `XGenMM(structured_outputs=...)` and chooses a grammar for each call: the reply is a
thought plus either an action on one of the tools, with arguments matching the tool's JSON schema, or an answer.
`min_tool_calls` / `max_tool_calls` (counted as observations since the user's last message) decide which of the two
is allowed, so "use a tool first" and "answer after N tool results" can be enforced. The grammar and the limits that
make every reply fit the call's `max_tokens` live in the core (`xgenmm.tool_calls.react`); this module only translates
LlamaIndex tools and messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from llama_index.core.base.llms.types import ChatMessage, MessageRole

from xgenmm.sampling_params import StructuredOutputsParams
from xgenmm.tool_calls import react as core_react
from xgenmm.tool_calls.react import ReActLimits, react_limits

__all__ = ["react_grammar", "ReActConstraint", "observations_since_user", "ReActLimits", "react_limits"]


def tool_dicts(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI tool dicts from LlamaIndex tools (anything with `.metadata.to_openai_tool`) or OpenAI dicts."""
    out = []
    for tool in tools:
        metadata = getattr(tool, "metadata", None)
        out.append(metadata.to_openai_tool(skip_length_check=True) if metadata is not None else tool)
    return out


def react_grammar(tools: Sequence[Any], *, allow_action: bool = True, allow_answer: bool = True,
                  limits: ReActLimits = ReActLimits()) -> str:
    """The core's ReAct grammar (`xgenmm.tool_calls.react.react_grammar`) for LlamaIndex tools."""
    return core_react.react_grammar(tool_dicts(tools), allow_action=allow_action, allow_answer=allow_answer,
                                    limits=limits)


def _role_text(messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
    return [(m.role.value if isinstance(m.role, MessageRole) else str(m.role), m.content or "") for m in messages]


def observations_since_user(messages: Sequence[ChatMessage]) -> int:
    """How many tool observations follow the user's last real message (ReActAgent sends them as user messages
    starting with "Observation:", or as tool messages)."""
    return core_react.observations_since_user(_role_text(messages))


class ReActConstraint:
    """`XGenMM(structured_outputs=ReActConstraint(tools, ...))`: a ReAct-format grammar chosen per call.

    Before `min_tool_calls` observations only an action is allowed; from `max_tool_calls` on only an answer; in
    between, either. The thought, argument and answer limits are derived from the call's `max_tokens` (the `XGenMM`
    passes it), so a reply is never cut before it parses; `max_thought_chars` / `max_answer_chars` /
    `max_argument_tokens` given here are caps on top. Calls that carry no ReAct system prompt (e.g. other uses of the
    same LLM) are not constrained unless `always=True`.
    """

    def __init__(self, tools: Sequence[Any], *, min_tool_calls: int = 0, max_tool_calls: Optional[int] = None,
                 always: bool = False, max_thought_chars: Optional[int] = None,
                 max_answer_chars: Optional[int] = None, max_argument_tokens: Optional[int] = None) -> None:
        if max_tool_calls is not None and max_tool_calls < min_tool_calls:
            raise ValueError(f"max_tool_calls ({max_tool_calls}) < min_tool_calls ({min_tool_calls})")
        self.tools = list(tools)
        self.min_tool_calls = min_tool_calls
        self.max_tool_calls = max_tool_calls
        self.always = always
        self._caps = {"max_thought_chars": max_thought_chars, "max_answer_chars": max_answer_chars,
                      "max_argument_tokens": max_argument_tokens}

    def limits(self, max_tokens: Optional[int]) -> ReActLimits:
        """The limits used for a call generating at most `max_tokens` (None: the caps, or the core's defaults)."""
        if max_tokens is None:
            caps = {k: v for k, v in self._caps.items() if v is not None}
            return ReActLimits(**caps)
        return react_limits(tool_dicts(self.tools), max_tokens, **self._caps)

    def __call__(self, messages: Sequence[ChatMessage], max_tokens: Optional[int] = None
                 ) -> Optional[StructuredOutputsParams]:
        if not self.always and not _looks_like_react(messages):
            return None
        seen = observations_since_user(messages)
        allow_action, allow_answer = core_react.react_step(seen, bool(self.tools), self.min_tool_calls,
                                                           self.max_tool_calls)
        return StructuredOutputsParams(grammar=react_grammar(
            self.tools, allow_action=allow_action, allow_answer=allow_answer, limits=self.limits(max_tokens)))


def _looks_like_react(messages: Sequence[ChatMessage]) -> bool:
    return any(m.role == MessageRole.SYSTEM and "Action Input:" in (m.content or "") for m in messages)
