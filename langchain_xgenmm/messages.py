"""LangChain messages -> the OpenAI-shaped chat messages the xgenmm core renders.

Content is read through `message.content_blocks` (langchain-core's normaliser: OpenAI `image_url` data / http(s)
URLs, v1 `base64` + `mime_type` / `url` blocks, v0 `source_type` blocks, Anthropic `source` blocks all come out as v1
`image` blocks), plus a fallback for the one form it leaves alone (OpenAI's bare-string `image_url`). Every block of
a human or tool message becomes exactly one core content part, so the core's "message i, part j" errors name the
LangChain message and block. Images are not decoded here: the core loads them under the chat model's
`ImageInputPolicy` (remote URLs and local files refused unless enabled).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from xgenmm.errors import ImageError, PromptError

__all__ = ["to_core_messages", "content_to_parts"]

_SKIPPED_AI_BLOCKS = ("tool_call", "tool_call_chunk", "invalid_tool_call", "reasoning", "server_tool_call",
                      "server_tool_call_chunk", "server_tool_result", "thinking", "tool_use")


def to_core_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Convert one conversation. Raises `PromptError` / `ImageError` naming the message (and block) at fault."""
    out: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}  # tool_call_id -> tool name, to label tool results
    for i, message in enumerate(messages):
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": _text_only(message, i)})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": content_to_parts(message, i)})
        elif isinstance(message, AIMessage):
            out.append(_assistant(message, i, tool_names))
        elif isinstance(message, ToolMessage):
            entry: dict[str, Any] = {"role": "tool", "tool_call_id": message.tool_call_id,
                                     "content": content_to_parts(message, i)}
            name = message.name or tool_names.get(message.tool_call_id)
            if name:
                entry["name"] = name
            if getattr(message, "status", "success") == "error":
                entry["status"] = "error"
            out.append(entry)
        elif isinstance(message, FunctionMessage):
            out.append({"role": "tool", "tool_call_id": message.name, "name": message.name,
                        "content": content_to_parts(message, i)})
        elif isinstance(message, ChatMessage):
            role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
            if role in ("system", "developer"):
                out.append({"role": role, "content": _text_only(message, i)})
            else:
                out.append({"role": role, "content": content_to_parts(message, i)})
        else:
            raise PromptError(f"message {i}: unsupported message type {type(message).__name__}")
    return out


def _assistant(message: AIMessage, index: int, tool_names: dict[str, str]) -> dict[str, Any]:
    texts = []
    for block in _blocks(message):
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text", ""))
        # images in assistant history are unusual; tool calls come from message.tool_calls; reasoning is dropped
    entry: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            call_id = call.get("id") or f"call_{index}_{len(calls)}"
            tool_names[call_id] = call["name"]
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": call["name"], "arguments": json.dumps(call.get("args") or {}, ensure_ascii=False)}})
        entry["tool_calls"] = calls
        if not entry["content"]:
            entry["content"] = None
    return entry


def _text_only(message: BaseMessage, index: int) -> str:
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, block in enumerate(_blocks(message)):
        if block.get("type") != "text":
            raise PromptError(f"message {index}, block {j}: a system message can only hold text, got {block.get('type')!r}")
        texts.append(block.get("text", ""))
    return "\n".join(texts)


def _blocks(message: BaseMessage) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"type": "text", "text": message.content}] if message.content else []
    try:
        return [dict(b) for b in message.content_blocks]
    except Exception:  # a block the normaliser chokes on: fall back to the raw list
        return [b if isinstance(b, dict) else {"type": "text", "text": str(b)} for b in message.content]


def content_to_parts(message: BaseMessage, index: int) -> str | list[dict[str, Any]]:
    """A human / tool message's content as core parts (text and `image_url` parts, one per block)."""
    if isinstance(message.content, str):
        return message.content
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(message)):
        parts.append(_block_to_part(block, f"message {index}, block {j}"))
    return parts


def _block_to_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    kind = block.get("type")
    if kind in ("text", "text-plain") and isinstance(block.get("text"), str):
        return {"type": "text", "text": block["text"]}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": _image_url(block, where)}}
    if kind == "non_standard":
        value = block.get("value")
        if isinstance(value, Mapping):
            return _raw_block_to_part(value, where)
    if kind == "image_url":  # the normaliser failed and we got the raw block
        return _raw_block_to_part(block, where)
    if kind in ("audio", "video", "file"):
        raise PromptError(f"{where}: xGen-MM takes text and images only, got a {kind!r} block")
    raise PromptError(f"{where}: unsupported content block type {kind!r}")


def _raw_block_to_part(value: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Blocks `content_blocks` leaves as non-standard: OpenAI `image_url` with a bare string, Anthropic-ish `source`."""
    kind = value.get("type")
    if kind == "image_url":
        inner = value.get("image_url")
        url = inner.get("url") if isinstance(inner, Mapping) else inner
        if not isinstance(url, str) or not url:
            raise ImageError(f"{where}: image_url block has no URL")
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "image" and isinstance(value.get("source"), Mapping):
        source = value["source"]
        if source.get("type") == "base64":
            return {"type": "image_url", "image_url": {"url": f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"}}
        if source.get("type") == "url":
            return {"type": "image_url", "image_url": {"url": source.get("url", "")}}
    if kind == "text" and isinstance(value.get("text"), str):
        return {"type": "text", "text": value["text"]}
    raise PromptError(f"{where}: unsupported content block {dict(value).get('type')!r}")


def _image_url(block: Mapping[str, Any], where: str) -> str:
    if block.get("base64"):
        mime = block.get("mime_type") or "image/png"
        return f"data:{mime};base64,{block['base64']}"
    url = block.get("url")
    if isinstance(url, str) and url:
        return url
    if block.get("file_id"):
        raise ImageError(f"{where}: file_id image references ({block['file_id']!r}) are not supported; "
                         "send the image inline (base64 / data URL) or as a URL")
    raise ImageError(f"{where}: image block has neither base64 data nor a url")
