"""`EngineHandle`: one opened engine as every client of it sees it (what `open_engine` returns).

It joins the engine core's thread (`CoreLoop`) with the client side of the request path, which lives here and only
here: the tokenizer, the chat renderer, the default image policy and the input processor (each image opened once,
the image count checked once, the grammar compiled once). `LLM`, `AsyncLLM`, the server, the CLI and both adapters
share a handle; the core only ever receives `PreparedRequest`s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..chat.request import ChatRequest
from ..chat.template import engine_chat_renderer
from ..engine.core_loop import CoreLoop, Sink
from ..engine.request import PreparedRequest
from ..errors import PromptError
from ..multimodal.image_processing import ImageProcessor
from ..multimodal.image_sources import ImageInputPolicy
from ..placement import Placement
from ..sampling_params import SamplingParams
from .inputs import InputProcessor
from .request_ids import new_request_id
from .settings import ClientSettings

__all__ = ["EngineHandle"]


class EngineHandle:
    """One engine core on its thread plus the client-side request path (see the module docstring)."""

    def __init__(self, *, backend: str, model: str, model_dir: Path, placement: Placement, loop: CoreLoop, tokenizer,
                 image_processor: ImageProcessor, settings: ClientSettings, grammar_compiler=None,
                 key: tuple | None = None):
        self.backend = backend
        self.model = model
        self.model_dir = model_dir
        self.placement = placement
        self.loop = loop
        self.tokenizer = tokenizer
        self.image_policy = settings.image_policy
        self.settings = settings
        self.key = key  # the front door's registry key (None: a private engine)
        self.chat_renderer = engine_chat_renderer(tokenizer, settings.chat_content_tokens)
        self.inputs = InputProcessor(tokenizer, image_processor, loop.core.input_spec,
                                     default_image_policy=settings.image_policy,
                                     max_concurrent_image_decodes=settings.max_concurrent_image_decodes,
                                     grammar_compiler=grammar_compiler)

    @property
    def core(self):
        """The engine core (`NativeEngineCore` or `VllmEngineCore`): for statistics and tests; requests go
        through `submit`."""
        return self.loop.core

    @property
    def max_model_len(self) -> int:
        return self.loop.core.input_spec.max_model_len

    # ---- request preparation (any thread) -------------------------------------------------------------------------
    def prepare(self, prompt: Any, params: SamplingParams | None, request_id: str | None = None,
                image_policy: ImageInputPolicy | None = None) -> PreparedRequest:
        """A vLLM-shaped prompt -> a request the core can run; every input error is raised here."""
        return self.inputs.process(prompt, params, request_id or new_request_id(), image_policy)

    def prepare_chat(self, request: ChatRequest, request_id: str | None = None) -> PreparedRequest:
        """One `ChatRequest` -> a request the core can run: rendered with the chat template, each image opened once
        (by the renderer, header-only) and then decoded once, checked once."""
        if not isinstance(request, ChatRequest):
            raise PromptError(f"prepare_chat needs a ChatRequest (xgenmm.chat.build_chat_request), got "
                              f"{type(request).__name__}")
        policy = request.image_policy or self.image_policy
        rendered = self.chat_renderer.render(request.messages, add_generation_prompt=request.add_generation_prompt,
                                             image_policy=policy, tools=request.tools,
                                             continue_final_message=request.continue_final_message)
        return self.inputs.process_opened(rendered.text, rendered.prompt_token_ids, rendered.images, request.params,
                                          request_id or new_request_id(), policy)

    # ---- the core loop (any thread) --------------------------------------------------------------------------------
    def submit(self, request: PreparedRequest, sink: Sink) -> None:
        self.loop.submit(request, sink)

    def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    def stats(self):
        return self.loop.stats()

    def check_alive(self) -> None:
        self.loop.check_alive()

    @property
    def is_open(self) -> bool:
        return self.loop.is_alive and not self.loop.is_stopped

    def shutdown(self) -> None:
        self.loop.shutdown()
