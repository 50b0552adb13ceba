"""`AsyncLLM`: asyncio streaming over a shared engine (opened through `xgenmm.client.open_engine`).

`generate` is an async generator of `RequestOutput`s, one per engine step that changed the request. Cancelling the
consuming task (or closing the generator) aborts the request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from .chat.request import ChatRequest
from .client.base import POLL_S, BaseClient, RequestStream
from .client.request_ids import new_request_id
from .multimodal.image_sources import ImageInputPolicy
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class AsyncLLM(BaseClient):
    """asyncio streaming over a shared engine (see `BaseClient`)."""

    async def generate(self, prompt: Any, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                       image_policy: ImageInputPolicy | None = None) -> AsyncIterator[RequestOutput]:
        request_id = request_id or new_request_id("async")
        # Decoding and tiling images is CPU work: keep it off the event loop.
        prepared = await asyncio.to_thread(self.handle.prepare, prompt, sampling_params, request_id, image_policy)
        async for out in self._stream(prepared):
            yield out

    async def chat(self, messages: list[dict] | ChatRequest, sampling_params: SamplingParams | None = None,
                   request_id: str | None = None, tools: list[dict] | None = None, add_generation_prompt: bool = True,
                   image_policy: ImageInputPolicy | None = None,
                   continue_final_message: bool = False) -> AsyncIterator[RequestOutput]:
        """One conversation (OpenAI-style messages, or a `ChatRequest`) -> its outputs as the engine makes them."""
        request = self._chat_request(messages, sampling_params, tools=tools, add_generation_prompt=add_generation_prompt,
                                     continue_final_message=continue_final_message, image_policy=image_policy)
        # Rendering, decoding and tiling images is CPU work: keep it off the event loop.
        prepared = await asyncio.to_thread(self.handle.prepare_chat, request, request_id or new_request_id("async"))
        async for out in self._stream(prepared):
            yield out

    async def _stream(self, prepared) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(out):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the event loop closed: nobody is listening any more
                pass

        stream = RequestStream(self.handle, prepared, sink)
        try:
            while not stream.finished:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=POLL_S)
                except asyncio.TimeoutError:
                    self.handle.check_alive()
                    continue
                yield stream.accept(item)
        finally:
            stream.close()

    async def abort(self, request_id: str) -> None:
        self.handle.abort(request_id)
