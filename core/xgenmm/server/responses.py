"""Builders for OpenAI chat-completion objects: responses, stream chunks, usage, logprobs, SSE framing."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from ..outputs import Logprob


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def sse(data: dict | str) -> str:
    """One server-sent event (`data: ...` + blank line)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


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


def chunk_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: list[dict] | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish_reason}
