"""`EngineClient`: what `LLM` (sync) and `AsyncLLM` (asyncio) share: the engine loop they talk to, its tokenizer and
stats, and turning an OpenAI-style conversation into an engine prompt with the engine's chat template.

Both are thin clients of a process-wide engine loop (one per model / device / dtype), so every client, adapter and
server in a process shares one set of weights, one KV cache and one continuous batch. The vLLM backend's clients are
the same classes over a vLLM engine loop (`_open_engine_loop` is the only difference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .checkpoint import DEFAULT_MODEL_ID
from .engine.engine_loop import EngineLoop, get_engine_loop
from .multimodal.image_sources import ImageInputPolicy

__all__ = ["EngineClient", "RequestStream"]

POLL_S = 5.0  # how often a waiting reader checks that the engine loop is still alive


class RequestStream:
    """One submitted request's outputs as the engine loop delivers them (on its thread), for a sync or an asyncio
    reader: `accept` turns each delivered item into an output (raising a delivered error), `close` aborts the
    request if the reader stops before the end (its KV blocks are freed)."""

    def __init__(self, loop: EngineLoop, prepared, deliver) -> None:
        self.loop = loop
        self.request_id = prepared.request_id
        self.finished = False
        loop.submit(prepared, deliver)

    def accept(self, item):
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.loop.abort(self.request_id)


class EngineClient:
    def __init__(self, model: str = DEFAULT_MODEL_ID, device: str | None = None, dtype: str | None = None,
                 **engine_options: Any):
        self.model = model
        self._loop: EngineLoop = self._open_engine_loop(model, device, dtype, **engine_options)

    @staticmethod
    def _open_engine_loop(model: str, device: str | None, dtype: Any, **options: Any) -> EngineLoop:
        """The process-wide engine loop these clients talk to (the vLLM backend's clients override this)."""
        return get_engine_loop(model, device, dtype, **options)

    @classmethod
    def from_engine_loop(cls, loop: EngineLoop):
        """Wrap an explicitly created (non-shared) engine loop, e.g. one with a deliberately small KV cache."""
        obj = cls.__new__(cls)
        obj.model = loop.engine.model_name
        obj._loop = loop
        return obj

    @property
    def engine(self):
        return self._loop.engine

    def get_tokenizer(self):
        return self._loop.engine.tokenizer

    def stats(self):
        return self._loop.stats()

    def _image_policy(self, image_policy: ImageInputPolicy | None) -> ImageInputPolicy:
        return image_policy or self._loop.engine.config.image_policy

    def _chat_prompt(self, messages: Sequence[Mapping[str, Any]], *, tools: list[dict] | None,
                     add_generation_prompt: bool, continue_final_message: bool,
                     image_policy: ImageInputPolicy | None) -> dict[str, Any]:
        """One conversation -> the engine prompt (rendered text, its upstream-exact ids, its images in order)."""
        rendered = self._loop.engine.chat_renderer.render(
            messages, add_generation_prompt=add_generation_prompt, image_policy=self._image_policy(image_policy),
            tools=tools, continue_final_message=continue_final_message)
        return {"prompt": rendered.text, "prompt_token_ids": rendered.prompt_token_ids,
                "multi_modal_data": {"image": rendered.images}}
