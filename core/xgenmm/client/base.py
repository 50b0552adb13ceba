"""`BaseClient`: what `LLM` (sync) and `AsyncLLM` (asyncio) share: the engine handle they talk to (opened through the
front door, `open_engine`), its tokenizer and stats, and `RequestStream` (one submitted request's outputs).

Both are thin clients of a process-wide engine (one per backend / model / device / dtype / options), so every
client, adapter and server in a process that asks for the same engine shares one set of weights, one KV cache and
one continuous batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..chat.request import ChatRequest
from ..checkpoint import DEFAULT_MODEL_ID
from ..multimodal.image_sources import ImageInputPolicy
from ..sampling_params import SamplingParams
from .front_door import open_engine
from .handle import EngineHandle

__all__ = ["BaseClient", "RequestStream", "POLL_S"]

POLL_S = 5.0  # how often a waiting reader checks that the engine loop is still alive


class RequestStream:
    """One submitted request's outputs as the engine loop delivers them (on its thread), for a sync or an asyncio
    reader: `accept` turns each delivered item into an output (raising a delivered error), `close` aborts the
    request if the reader stops before the end (its KV blocks are freed)."""

    def __init__(self, handle: EngineHandle, prepared, deliver) -> None:
        self.handle = handle
        self.request_id = prepared.request_id
        self.finished = False
        handle.submit(prepared, deliver)

    def accept(self, item):
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.handle.abort(self.request_id)


class BaseClient:
    """`LLM(model, device=None, dtype=None, backend="native", **engine_options)`: the engine comes from the front
    door (`xgenmm.client.open_engine`, shared by key); `from_handle` wraps one already opened (e.g. a private one)."""

    def __init__(self, model: str = DEFAULT_MODEL_ID, device: Any = None, dtype: Any = None, *,
                 backend: str = "native", **engine_options: Any):
        self.handle: EngineHandle = open_engine(backend, model, device, dtype, **engine_options)
        self.model = model

    @classmethod
    def from_handle(cls, handle: EngineHandle):
        """A client of an engine already opened with `open_engine` (shared or private)."""
        obj = cls.__new__(cls)
        obj.model = handle.model
        obj.handle = handle
        return obj

    def get_tokenizer(self):
        return self.handle.tokenizer

    def stats(self):
        return self.handle.stats()

    @staticmethod
    def _chat_request(messages: Sequence[Mapping[str, Any]] | ChatRequest, params: SamplingParams | None, *,
                      tools: list[dict] | None, add_generation_prompt: bool, continue_final_message: bool,
                      image_policy: ImageInputPolicy | None) -> ChatRequest:
        """The vLLM-shaped `chat(messages, params, tools=..., ...)` arguments as one `ChatRequest` (a `ChatRequest`
        passes as it is)."""
        if isinstance(messages, ChatRequest):
            return messages
        return ChatRequest(messages=messages, params=params if params is not None else SamplingParams(),
                           tools=tools, image_policy=image_policy, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message)
