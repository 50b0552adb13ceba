"""Builders for OpenAI chat-completion objects: responses, stream chunks, SSE framing (usage: `chat.reply.usage_of`)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..chat.reply import TokenPieces, logprobs_content

__all__ = ["TokenPieces", "logprobs_content", "new_completion_id", "now", "sse", "SSE_DONE", "chat_message",
           "completion_response", "chunk", "chunk_choice"]


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def sse(data: dict | str) -> str:
    """One server-sent event (`data: ...` + blank line)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


def chat_message(content: str | None, tool_calls: list[dict] | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def completion_response(completion_id: str, created: int, model: str, choices: list[dict], usage_obj: dict) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_obj}


def chunk(completion_id: str, created: int, model: str, choices: list[dict], usage_obj: dict | None = None,
          include_usage: bool = False) -> dict:
    out = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None, "choices": choices}
    if include_usage:
        out["usage"] = usage_obj
    return out


def chunk_choice(index: int, delta: dict, finish_reason: str | None = None) -> dict:
    """One streamed choice; its logprobs (if asked for) are added by the caller on the delta's first chunk."""
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
