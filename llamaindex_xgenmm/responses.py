"""Core `RequestOutput`s -> LlamaIndex `ChatResponse`s: text, tool calls, logprobs, token usage.

The reading of a reply (prose vs tool calls, the OpenAI finish reason, usage) is the core's `xgenmm.chat.reply`,
shared with the server and the LangChain adapter; this module only builds LlamaIndex types from it. Usage is where
LlamaIndex users and `TokenCountingHandler` look for it: `raw["usage"]` (OpenAI shape, with
`prompt_tokens_details.cached_tokens`) and the flat `prompt_tokens` / `completion_tokens` / `total_tokens` /
`cached_tokens` in `ChatResponse.additional_kwargs`. Tool calls are `ToolCallBlock`s in `message.blocks` and OpenAI
dicts in `message.additional_kwargs["tool_calls"]` (an empty list when there are none).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, LogProb, MessageRole, TextBlock, ToolCallBlock

from xgenmm.chat import ChatChoice, chat_choice, usage_of
from xgenmm.chat.reply import TokenPieces
from xgenmm.outputs import CompletionOutput, RequestOutput

__all__ = ["final_chat_response", "ChatStreamAssembler"]


def _usage(output: RequestOutput) -> dict[str, int]:
    usage = usage_of(output)
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "cached_tokens": usage.cached_tokens}


def _raw(output: RequestOutput, model: str, text: str, finish_reason: str | None, stop_reason,
         usage: dict[str, int] | None) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model": model,
        "request_id": output.request_id,
        "text": text,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }
    if usage is not None:
        raw["usage"] = {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]},
        }
    if len(output.outputs) > 1:  # n > 1: LlamaIndex's response holds one message; the others are here
        raw["choices"] = [{"index": o.index, "text": o.text, "finish_reason": o.finish_reason} for o in output.outputs]
    return raw


def _assistant_message(reply: ChatChoice) -> ChatMessage:
    content = reply.content or ""
    blocks: list[Any] = [TextBlock(text=content)] if content or not reply.tool_calls else []
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=dict(c.arguments))
               for c in reply.tool_calls]
    extra: dict[str, Any] = {"tool_calls": [c.to_openai() for c in reply.tool_calls]}
    if reply.invalid_tool_calls:
        extra["invalid_tool_calls"] = [
            {"id": c.id, "name": c.name, "arguments": c.arguments, "error": c.error} for c in reply.invalid_tool_calls
        ]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def _logprobs(completion: CompletionOutput, tokenizer) -> list[list[LogProb]] | None:
    if completion.logprobs is None or tokenizer is None:
        return None
    pieces = TokenPieces(tokenizer)
    out = []
    for entries in completion.logprobs:
        ranked = sorted(entries.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        out.append([LogProb(token=pieces(tid)[0], logprob=lp.logprob, bytes=pieces(tid)[1]) for tid, lp in ranked])
    return out


def final_chat_response(output: RequestOutput, model: str, tools: Sequence[Mapping[str, Any]] | None,
                        delta: str | None = None, tokenizer=None, completion: CompletionOutput | None = None
                        ) -> ChatResponse:
    """The response for a finished request (`completion` overrides its first sample, for DELTA streams)."""
    completion = output.outputs[0] if completion is None else completion
    reply = chat_choice(completion, tools)
    usage = _usage(output)
    return ChatResponse(
        message=_assistant_message(reply),
        raw=_raw(output, model, completion.text, reply.finish_reason, completion.stop_reason, usage),
        delta=delta,
        logprobs=_logprobs(completion, tokenizer),
        additional_kwargs=dict(usage),
    )


class ChatStreamAssembler:
    """DELTA outputs -> streamed `ChatResponse`s (shared by `stream_chat` and `astream_chat`): the cumulative text so
    far and the new piece (Ollama's convention), then a final response with tool calls and usage."""

    def __init__(self, model: str, tools: Sequence[Mapping[str, Any]] | None, tokenizer=None,
                 want_logprobs: bool = False) -> None:
        self.model = model
        self.tools = tools
        self.tokenizer = tokenizer
        self.completion = CompletionOutput(0, "", [], None, [] if want_logprobs else None, None)

    def feed(self, output: RequestOutput) -> ChatResponse | None:
        delta = output.outputs[0] if output.outputs else CompletionOutput(0, "", [])
        done = self.completion
        done.text += delta.text
        done.token_ids.extend(delta.token_ids)
        if done.logprobs is not None and delta.logprobs:
            done.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            done.finish_reason, done.stop_reason = delta.finish_reason, delta.stop_reason
        if output.finished:
            return final_chat_response(output, self.model, self.tools, delta=delta.text, tokenizer=self.tokenizer,
                                       completion=done)
        if not delta.text:
            return None
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, blocks=[TextBlock(text=done.text)],
                                additional_kwargs={"tool_calls": []}),
            raw=_raw(output, self.model, done.text, None, None, None),
            delta=delta.text,
        )
