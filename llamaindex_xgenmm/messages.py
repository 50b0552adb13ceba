"""LlamaIndex `ChatMessage`s -> the core's OpenAI-shaped message dicts (what `xgenmm.LLM.chat` renders).

Images are never flattened away: every `ImageBlock` becomes an image part, loaded later by the core under the
caller's `ImageInputPolicy` (remote URLs and local paths are refused unless enabled). Blocks the model cannot take
(audio, video, documents) raise `PromptError` naming the message and block, instead of being dropped.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from io import IOBase
from pathlib import Path
from typing import Any

from llama_index.core.base.llms.types import (
    AudioBlock,
    CachePoint,
    ChatMessage,
    CitableBlock,
    CitationBlock,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
    VideoBlock,
)
from llama_index.core.schema import ImageDocument, ImageNode, NodeWithScore

from xgenmm.errors import ImageError, PromptError

__all__ = ["to_core_messages", "to_image_block", "image_part"]

_ROLE_MAP = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


def to_core_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Convert a conversation; raises `PromptError` for a block or role the model cannot take."""
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    role = _ROLE_MAP.get(message.role)
    if role is None:
        raise PromptError(f"message {index}: unsupported role {message.role!r}")
    parts, tool_calls = _blocks(message.blocks, f"message {index}")
    if role == "assistant":
        if not tool_calls:
            tool_calls = [_openai_call(c, f"message {index}") for c in message.additional_kwargs.get("tool_calls") or []]
        out: dict[str, Any] = {"role": "assistant", "content": _content(parts) if parts or not tool_calls else None}
        if tool_calls:
            out["tool_calls"] = tool_calls
        return out
    if tool_calls:
        raise PromptError(f"message {index}: only assistant messages can hold tool calls, not {role!r}")
    out = {"role": role, "content": _content(parts)}
    if role == "tool":
        extra = message.additional_kwargs
        if extra.get("tool_call_id"):
            out["tool_call_id"] = str(extra["tool_call_id"])
        name = extra.get("name") or extra.get("tool_name")
        if name:
            out["name"] = str(name)
    return out


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Plain text stays a string (the common case); anything with an image stays a list of parts, in order."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _blocks(blocks: Sequence[Any], where: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    parts: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        here = f"{where}, block {j}"
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(image_part(block, here))
        elif isinstance(block, ToolCallBlock):
            tool_calls.append(_tool_call_block(block))
        elif isinstance(block, CitableBlock):
            inner, _ = _blocks(block.content, here)
            parts.extend(inner)
        elif isinstance(block, CitationBlock):
            inner, _ = _blocks([block.cited_content], here)
            parts.extend(inner)
        elif isinstance(block, (CachePoint, ThinkingBlock)):
            # A cache hint carries no content; earlier reasoning is not replayed to the model (as other integrations).
            continue
        elif isinstance(block, (AudioBlock, VideoBlock, DocumentBlock)):
            raise PromptError(
                f"{here}: {type(block).__name__} is not supported by xGen-MM, which takes text and images only"
            )
        else:
            raise PromptError(f"{here}: unsupported content block {type(block).__name__}")
    return parts, tool_calls


def image_part(block: ImageBlock, where: str = "image") -> dict[str, Any]:
    """One `ImageBlock` as a core image part. Bytes are decoded here; paths and URLs are left for the core's loader,
    so the input policy (local files, remote URLs, SSRF guard) decides whether they may be read."""
    if block.image is not None:
        if isinstance(block.image, IOBase):
            block.image.seek(0)
            data = block.image.read()
        else:
            data = block.resolve_image().read()  # the validator stored the bytes base64-encoded; this decodes them
        if not data:
            raise ImageError(f"{where}: ImageBlock holds no image data")
        return {"type": "image", "image": bytes(data)}
    if block.path is not None:
        return {"type": "image", "image": Path(block.path)}
    if block.url is not None:
        return {"type": "image_url", "image_url": {"url": str(block.url)}}
    raise ImageError(f"{where}: ImageBlock has neither image data, a path nor a URL")


def _tool_call_block(block: ToolCallBlock) -> dict[str, Any]:
    arguments = block.tool_kwargs
    return {
        "id": block.tool_call_id or block.tool_name,
        "type": "function",
        "function": {
            "name": block.tool_name,
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
        },
    }


def _openai_call(call: Any, where: str) -> dict[str, Any]:
    """An entry of `additional_kwargs["tool_calls"]` (OpenAI dict, or an object with the same attributes)."""
    if not isinstance(call, dict):
        call = call.model_dump() if hasattr(call, "model_dump") else dict(call)
    fn = call.get("function") or {}
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise PromptError(f"{where}: tool call without function.name: {call!r}")
    arguments = fn.get("arguments", {})
    return {
        "id": call.get("id") or fn["name"],
        "type": "function",
        "function": {
            "name": fn["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
        },
    }


def to_image_block(item: Any) -> ImageBlock:
    """An `ImageBlock` from what the legacy multimodal API and retrieval hand around: `ImageBlock`, `ImageDocument`,
    `ImageNode` (or a `NodeWithScore` around one). Raises `ImageError` when the item carries no image."""
    if isinstance(item, ImageBlock):
        return item
    if isinstance(item, NodeWithScore):
        item = item.node
    if isinstance(item, (ImageDocument, ImageNode)):
        mimetype = item.image_mimetype
        if item.image:
            return ImageBlock(image=base64.b64decode(item.image), image_mimetype=mimetype)
        if item.image_path:
            path = Path(item.image_path)
            if not path.is_file():
                raise ImageError(f"{type(item).__name__} {item.id_!r}: image file not found: {str(path)!r}")
            return ImageBlock(path=path, image_mimetype=mimetype)
        if item.image_url:
            return ImageBlock(url=str(item.image_url), image_mimetype=mimetype)
        raise ImageError(f"{type(item).__name__} {item.id_!r} has no image (no image data, image_path or image_url)")
    raise ImageError(
        f"cannot use {type(item).__name__} as an image; pass ImageBlock, ImageDocument or ImageNode objects"
    )
