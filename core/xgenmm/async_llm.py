"""`AsyncLLM`: asyncio streaming over the shared engine loop.

`generate` is an async generator of `RequestOutput`s, one per engine step that changed the request. Cancelling the
consuming task (or closing the generator) aborts the request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from .checkpoint import DEFAULT_MODEL_ID
from .engine.engine_loop import EngineLoop, get_engine_loop, new_request_id
from .multimodal.image_sources import ImageInputPolicy
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, model: str = DEFAULT_MODEL_ID, device: str | None = None, dtype: str | None = None,
                 **engine_options: Any):
        self.model = model
        self._loop: EngineLoop = get_engine_loop(model, device, dtype, **engine_options)

    @classmethod
    def from_engine_loop(cls, loop: EngineLoop) -> "AsyncLLM":
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

    async def generate(self, prompt: Any, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                       image_policy: ImageInputPolicy | None = None) -> AsyncIterator[RequestOutput]:
        request_id = request_id or new_request_id("async")
        # Decoding and tiling images is CPU work: keep it off the event loop.
        prepared = await asyncio.to_thread(self._loop.prepare, prompt, sampling_params, request_id, image_policy)
        async for out in self._stream(prepared):
            yield out

    async def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
                   request_id: str | None = None, tools: list[dict] | None = None, add_generation_prompt: bool = True,
                   image_policy: ImageInputPolicy | None = None,
                   continue_final_message: bool = False) -> AsyncIterator[RequestOutput]:
        policy = image_policy or self._loop.engine.config.image_policy
        renderer = self._loop.engine.chat_renderer
        rendered = await asyncio.to_thread(renderer.render, messages, add_generation_prompt=add_generation_prompt,
                                           image_policy=policy, tools=tools,
                                           continue_final_message=continue_final_message)
        prompt = {"prompt": rendered.text, "prompt_token_ids": rendered.prompt_token_ids,
                  "multi_modal_data": {"image": rendered.images}}
        async for out in self.generate(prompt, sampling_params, request_id, policy):
            yield out

    async def _stream(self, prepared) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(out):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the event loop closed: nobody is listening any more
                pass

        finished = False
        self._loop.submit(prepared, sink)
        try:
            while True:
                try:
                    out = await asyncio.wait_for(queue.get(), timeout=5.0)
                except asyncio.TimeoutError:
                    self._loop.check_alive()
                    continue
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self._loop.abort(prepared.request_id)

    async def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)
