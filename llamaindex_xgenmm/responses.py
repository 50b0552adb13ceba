"""Core `RequestOutput`s -> LlamaIndex `ChatResponse`s: text, tool calls, token usage.

Usage is where LlamaIndex users and `TokenCountingHandler` look for it: `raw["usage"]` (OpenAI shape, with
`prompt_tokens_details.cached_tokens`) and the flat `prompt_tokens` / `completion_tokens` / `total_tokens` /
`cached_tokens` in `ChatResponse.additional_kwargs`. Tool calls are `ToolCallBlock`s in `message.blocks` and OpenAI
dicts in `message.additional_kwargs["tool_calls"]` (an empty list when there are none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)

from xgenmm.outputs import RequestOutput
from xgenmm.tools import ParsedReply, parse_tool_calls

__all__ = ["usage_of", "final_chat_response", "chunk_chat_response", "parse_reply"]


def usage_of(output: RequestOutput) -> dict[str, int]:
    metrics = output.metrics
    prompt = metrics.num_prompt_tokens if metrics else len(output.prompt_token_ids)
    completion = metrics.num_generated_tokens if metrics else sum(len(o.token_ids) for o in output.outputs)
    cached = metrics.num_cached_tokens if metrics else output.num_cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "cached_tokens": cached}


def _raw(output: RequestOutput, model: str, text: str, usage: dict[str, int] | None) -> dict[str, Any]:
    completion = output.outputs[0]
    raw: dict[str, Any] = {
        "model": model,
        "request_id": output.request_id,
        "text": text,
        "finish_reason": completion.finish_reason,
        "stop_reason": completion.stop_reason,
    }
    if usage is not None:
        raw["usage"] = {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]},
        }
    return raw


def parse_reply(text: str, tools: Sequence[Mapping[str, Any]] | None) -> ParsedReply:
    """Without tools the text is the reply as is (a plain chat never turns prose into a call)."""
    if not tools:
        return ParsedReply(content=text)
    return parse_tool_calls(text, tools)


def _assistant_message(parsed: ParsedReply) -> ChatMessage:
    blocks: list[Any] = [TextBlock(text=parsed.content)] if parsed.content or not parsed.tool_calls else []
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=dict(c.arguments))
               for c in parsed.tool_calls]
    extra: dict[str, Any] = {"tool_calls": [c.to_openai() for c in parsed.tool_calls]}
    if parsed.invalid:
        extra["invalid_tool_calls"] = [
            {"id": c.id, "name": c.name, "arguments": c.arguments, "error": c.error} for c in parsed.invalid
        ]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def final_chat_response(output: RequestOutput, model: str, tools: Sequence[Mapping[str, Any]] | None,
                        text: str | None = None, delta: str | None = None) -> ChatResponse:
    """The response for a finished request (`text` overrides the output's text, for DELTA streams)."""
    text = output.outputs[0].text if text is None else text
    usage = usage_of(output)
    parsed = parse_reply(text, tools)
    return ChatResponse(
        message=_assistant_message(parsed),
        raw=_raw(output, model, text, usage),
        delta=delta,
        additional_kwargs=dict(usage),
    )


def chunk_chat_response(output: RequestOutput, model: str, text: str, delta: str) -> ChatResponse:
    """An intermediate streamed response: the cumulative text so far (Ollama's convention) and the new piece."""
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, blocks=[TextBlock(text=text)],
                            additional_kwargs={"tool_calls": []}),
        raw=_raw(output, model, text, None),
        delta=delta,
    )
