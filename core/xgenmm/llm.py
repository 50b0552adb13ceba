"""`LLM`: the synchronous, vLLM-shaped entry point (`generate`, `chat`).

It is a thin client of an engine opened through the front door (`xgenmm.client.open_engine`): several `LLM` objects
(or threads using one) asking for the same engine share the same weights, KV cache and continuous batch.
"""

from __future__ import annotations

import queue
import threading
from typing import Sequence

from .chat.request import ChatRequest
from .client.base import POLL_S, BaseClient, RequestStream
from .client.request_ids import new_request_id
from .errors import PromptError, SamplingParamsError
from .multimodal.image_sources import ImageInputPolicy
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class _Collector:
    """Gathers the final output of each submitted request (any thread delivers, the caller waits)."""

    def __init__(self, count: int, progress=None):
        self.results: list[RequestOutput | BaseException | None] = [None] * count
        self._remaining = count
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._progress = progress
        if count == 0:
            self._done.set()

    def sink_for(self, index: int):
        def sink(out):
            if isinstance(out, RequestOutput) and not out.finished:
                return
            with self._lock:
                self.results[index] = out
                self._remaining -= 1
                if self._progress is not None and isinstance(out, RequestOutput):
                    self._progress.update(1)
                    self._progress.set_postfix(gen_tokens=sum(len(o.token_ids) for o in out.outputs), refresh=False)
                if self._remaining == 0:
                    self._done.set()

        return sink

    def wait(self, handle) -> None:
        while not self._done.wait(timeout=5.0):
            handle.check_alive()


def _as_list(prompts) -> tuple[list, bool]:
    if isinstance(prompts, (str, dict)):
        return [prompts], True
    try:
        return list(prompts), False
    except TypeError:
        raise PromptError(f"prompts must be a str, a prompt dict or a list of them, got {type(prompts).__name__}") from None


class LLM(BaseClient):
    """vLLM's `LLM` shape over a shared engine (see `BaseClient`): `LLM(model, device=None, dtype=None,
    backend="native", **engine_options)`."""

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, image_policy: ImageInputPolicy | None = None) -> list[RequestOutput]:
        """Run every prompt through the shared engine (batched together) and return their final outputs in order.

        Every prompt is validated first (a bad one raises before anything runs); an error raised later for one
        request (e.g. it can never fit the KV cache) is re-raised after the others have finished.
        """
        items, _ = _as_list(prompts)
        params = self._params_list(sampling_params, len(items))
        prepared = [self.handle.prepare(p, sp, new_request_id("gen"), image_policy) for p, sp in zip(items, params)]
        return self._run(prepared, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, tools: list[dict] | None = None, add_generation_prompt: bool = True,
             image_policy: ImageInputPolicy | None = None, continue_final_message: bool = False) -> list[RequestOutput]:
        """OpenAI-style messages (one conversation, or a list of conversations), or a `ChatRequest` (or a list of
        them, from `xgenmm.chat.build_chat_request`) -> outputs. As vLLM's: `continue_final_message=True` (with
        `add_generation_prompt=False`) continues the last assistant message."""
        if isinstance(messages, ChatRequest) or (messages and isinstance(messages[0], dict)):
            conversations = [messages]
        else:
            conversations = list(messages)
        params = self._params_list(sampling_params, len(conversations))
        requests = [self._chat_request(conv, sp, tools=tools, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, image_policy=image_policy)
                    for conv, sp in zip(conversations, params)]
        prepared = [self.handle.prepare_chat(r, new_request_id("chat")) for r in requests]
        return self._run(prepared, use_tqdm)

    def stream(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
               image_policy: ImageInputPolicy | None = None):
        """Synchronous streaming: yields a `RequestOutput` per engine step that changed this request.

        Use `SamplingParams(output_kind=RequestOutputKind.DELTA)` to receive only the new text / tokens each time.
        Closing the iterator early aborts the request (its KV blocks are freed).
        """
        prepared = self.handle.prepare(prompt, sampling_params, request_id or new_request_id("stream"), image_policy)
        return self._stream(prepared)

    def chat_stream(self, messages: list[dict] | ChatRequest, sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, tools: list[dict] | None = None, add_generation_prompt: bool = True,
                    image_policy: ImageInputPolicy | None = None, continue_final_message: bool = False):
        """`stream` for one OpenAI-style conversation (or one `ChatRequest`)."""
        request = self._chat_request(messages, sampling_params, tools=tools, add_generation_prompt=add_generation_prompt,
                                     continue_final_message=continue_final_message, image_policy=image_policy)
        return self._stream(self.handle.prepare_chat(request, request_id or new_request_id("stream")))

    def _stream(self, prepared):
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        stream = RequestStream(self.handle, prepared, outputs.put)
        try:
            while not stream.finished:
                try:
                    yield stream.accept(outputs.get(timeout=POLL_S))
                except queue.Empty:
                    self.handle.check_alive()
        finally:
            stream.close()

    @staticmethod
    def _params_list(sampling_params, count: int) -> list[SamplingParams | None]:
        if sampling_params is None:
            return [None] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise SamplingParamsError(f"got {len(params)} SamplingParams for {count} prompts", field="sampling_params")
        return params

    def _run(self, prepared, use_tqdm: bool) -> list[RequestOutput]:
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(prepared), desc="xgenmm generate", unit="req")
        collector = _Collector(len(prepared), progress)
        try:
            for i, p in enumerate(prepared):
                self.handle.submit(p, collector.sink_for(i))
            collector.wait(self.handle)
        except BaseException:
            for p in prepared:
                self.handle.abort(p.request_id)
            raise
        finally:
            if progress is not None:
                progress.close()
        for r in collector.results:
            if isinstance(r, BaseException):
                raise r
        return collector.results  # type: ignore[return-value]
