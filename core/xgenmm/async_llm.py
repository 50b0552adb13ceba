"""`AsyncLLM`: asyncio streaming over the shared engine loop.

`generate` is an async generator of `RequestOutput`s, one per engine step that changed the request. Cancelling the
consuming task (or closing the generator) aborts the request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from .engine.engine_loop import new_request_id
from .engine_client import POLL_S, EngineClient, RequestStream
from .input_work import messages_have_images, prompt_has_images, run_input_work
from .multimodal.image_sources import ImageInputPolicy
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class AsyncLLM(EngineClient):
    """asyncio streaming over the shared engine loop (see `EngineClient`)."""

    async def generate(self, prompt: Any, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                       image_policy: ImageInputPolicy | None = None) -> AsyncIterator[RequestOutput]:
        request_id = request_id or new_request_id("async")
        # Decoding and tiling images is CPU work: keep it off the event loop (image requests on their own pool).
        prepared = await run_input_work(self._loop.prepare, prompt, sampling_params, request_id, image_policy,
                                        images=prompt_has_images(prompt))
        async for out in self._stream(prepared):
            yield out

    async def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
                   request_id: str | None = None, tools: list[dict] | None = None, add_generation_prompt: bool = True,
                   image_policy: ImageInputPolicy | None = None,
                   continue_final_message: bool = False) -> AsyncIterator[RequestOutput]:
        # Rendering decodes images (CPU work): keep it off the event loop.
        prompt = await run_input_work(self._chat_prompt, messages, tools=tools,
                                      add_generation_prompt=add_generation_prompt,
                                      continue_final_message=continue_final_message, image_policy=image_policy,
                                      images=messages_have_images(messages))
        async for out in self.generate(prompt, sampling_params, request_id, image_policy):
            yield out

    async def _stream(self, prepared) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(out):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the event loop closed: nobody is listening any more
                pass

        stream = RequestStream(self._loop, prepared, sink)
        try:
            while not stream.finished:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=POLL_S)
                except asyncio.TimeoutError:
                    self._loop.check_alive()
                    continue
                yield stream.accept(item)
        finally:
            stream.close()

    async def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)
