"""Engine outputs -> what every chat front end reports: usage, the OpenAI finish reason, each choice's prose and tool
calls, and the same for a stream (`ChoiceStream`). The server, LangChain and LlamaIndex adapters only map these to
their own types.

Finish reasons follow OpenAI: "tool_calls" when the reply holds tool calls, else the engine's ("stop", "length",
"abort").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..tool_calls import InvalidToolCall, ToolCall, ToolCallStreamParser, parse_tool_calls

__all__ = ["Usage", "ChatChoice", "ReplyEvent", "ChoiceStream", "TokenPieces", "usage_of", "chat_choice",
           "finish_reason_of", "logprobs_content"]


@dataclass(frozen=True)
class Usage:
    """Token counts of a request (prompt tokens include image tokens; cached = prefix-cache hits)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_openai(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def usage_of(output: RequestOutput) -> Usage:
    """Usage of a finished (or latest) `RequestOutput`, all samples together."""
    metrics = output.metrics
    if metrics is not None:
        return Usage(metrics.num_prompt_tokens, metrics.num_generated_tokens, metrics.num_cached_tokens)
    generated = sum(len(o.token_ids) for o in output.outputs)
    return Usage(len(output.prompt_token_ids), generated, output.num_cached_tokens)


def finish_reason_of(completion: CompletionOutput, has_tool_calls: bool) -> str | None:
    if completion.finish_reason is None:
        return None
    return "tool_calls" if has_tool_calls else completion.finish_reason


@dataclass(frozen=True)
class ChatChoice:
    """One sample of a finished chat reply."""

    index: int
    content: str | None  # None when the reply is only tool calls
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    completion: CompletionOutput | None = None  # token ids, logprobs


def chat_choice(completion: CompletionOutput, tools: Sequence[Mapping[str, Any]] | None) -> ChatChoice:
    """A finished sample -> its prose and tool calls (parsed against `tools`, when the request offered any)."""
    if not tools:
        return ChatChoice(completion.index, completion.text, [], [], completion.finish_reason,
                          completion.stop_reason, completion)
    parsed = parse_tool_calls(completion.text, tools)
    if not (parsed.tool_calls or parsed.invalid):
        content = completion.text
    else:
        content = parsed.content or None
    return ChatChoice(completion.index, content, list(parsed.tool_calls), list(parsed.invalid),
                      finish_reason_of(completion, bool(parsed.tool_calls)), completion.stop_reason, completion)


@dataclass(frozen=True)
class ReplyEvent:
    """One thing a stream says: new prose, a complete tool call (with its position among the choice's calls), an
    unusable call, or the end of the choice (`finish_reason`)."""

    text: str | None = None
    tool_call: ToolCall | None = None
    invalid_tool_call: InvalidToolCall | None = None
    tool_call_index: int | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChoiceStream:
    """One choice of a streamed reply: feed it the DELTA `CompletionOutput`s, get `ReplyEvent`s (prose as it comes,
    tool calls once complete, the finish reason last)."""

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.parser = ToolCallStreamParser(tools) if tools else None
        self.num_tool_calls = 0  # valid and invalid: the index the next call event gets
        self.num_valid_tool_calls = 0
        self.finished = False

    def feed(self, delta: CompletionOutput) -> list[ReplyEvent]:
        if self.finished:
            return []
        events: list[ReplyEvent] = []
        if self.parser is None:
            if delta.text:
                events.append(ReplyEvent(text=delta.text))
        else:
            parsed = self.parser.feed(delta.text) if delta.text else []
            if delta.finish_reason is not None:
                parsed += self.parser.finish()
            for ev in parsed:
                if ev.text:
                    events.append(ReplyEvent(text=ev.text))
                elif ev.tool_call is not None or ev.invalid is not None:
                    events.append(ReplyEvent(tool_call=ev.tool_call, invalid_tool_call=ev.invalid,
                                             tool_call_index=self.num_tool_calls))
                    self.num_tool_calls += 1
                    self.num_valid_tool_calls += ev.tool_call is not None
        if delta.finish_reason is not None:
            self.finished = True
            events.append(ReplyEvent(finish_reason=finish_reason_of(delta, self.num_valid_tool_calls > 0),
                                     stop_reason=delta.stop_reason))
        return events


# ---- OpenAI-shaped logprobs ---------------------------------------------------------------------------------

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenPieces:
    """The text and bytes of single tokens, as OpenAI logprobs show them (`"▁the"` -> `" the"`, byte-fallback
    pieces `<0xE2>` -> `"bytes:\\xe2"` with bytes [226]), cached per token id."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._piece(token_id)
        return hit

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            piece = self._tokenizer.decode([token_id])
        match = _BYTE_PIECE.match(piece)
        if match:
            value = int(match.group(1), 16)
            return f"bytes:\\x{value:02x}", [value]
        text = piece.replace("\u2581", " ")
        return text, list(text.encode("utf-8"))


def _token_entry(token_id: int, logprob: float, pieces: TokenPieces) -> dict:
    text, raw = pieces(token_id)
    return {"token": text, "logprob": max(float(logprob), -9999.0), "bytes": raw}


def logprobs_content(token_ids: list[int], logprobs: list[dict[int, Logprob]] | None, top_n: int,
                     pieces: TokenPieces) -> list[dict]:
    """OpenAI `logprobs.content`: the sampled token's logprob plus the `top_n` most likely alternatives."""
    items = []
    for token_id, entries in zip(token_ids, logprobs or ()):
        chosen = entries.get(token_id)
        item = _token_entry(token_id, chosen.logprob if chosen is not None else float("-inf"), pieces)
        top = []
        for tid, lp in sorted(entries.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30):
            if len(top) >= top_n or lp.rank is None or lp.rank > top_n:
                break
            top.append(_token_entry(tid, lp.logprob, pieces))
        item["top_logprobs"] = top
        items.append(item)
    return items
