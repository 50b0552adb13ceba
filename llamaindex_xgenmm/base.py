"""`XGenMM`: xGen-MM (BLIP-3) as a LlamaIndex `FunctionCallingLLM`, multimodal through `ChatMessage.blocks`.

A thin adapter in the style of `llama-index-llms-ollama`: it translates messages, sampling options and tool specs
to the core (`xgenmm.LLM` / `xgenmm.AsyncLLM`) and the core's outputs back. The four chat methods are native; the
`complete*` methods are derived from them. Async methods run on the core's asyncio front end (no thread pool), so
concurrent `achat` calls join the engine's continuous batch. Tool calls use the core's shared format, parser and
grammar (`xgenmm.tools`); a required tool call is grammar-constrained, so it is always well formed.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from llama_index.core.base.llms.generic_utils import (
    achat_to_completion_decorator,
    astream_chat_to_completion_decorator,
    chat_response_to_completion_response,
    chat_to_completion_decorator,
    stream_chat_to_completion_decorator,
    stream_chat_response_to_completion_response,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_NUM_OUTPUTS
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from xgenmm.backends import Engine, get_engine
from xgenmm.checkpoint import DEFAULT_MODEL_ID
from xgenmm.errors import SamplingParamsError
from xgenmm.multimodal.image_sources import DEFAULT_MAX_IMAGE_BYTES, ImageInputPolicy
from xgenmm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from xgenmm.tools import tool_call_structured_outputs

from .messages import to_core_messages, to_image_block
from .responses import chunk_chat_response, final_chat_response

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["XGenMM", "DEFAULT_CONTEXT_WINDOW"]

DEFAULT_CONTEXT_WINDOW = 4096  # Phi-3-mini-4k, the xGen-MM v1.5 language model
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclasses.dataclass(frozen=True)
class _Request:
    """One chat call, translated: core messages, sampling options, tools and the image policy."""

    messages: list[dict[str, Any]]
    params: SamplingParams
    tools: list[dict[str, Any]] | None
    policy: ImageInputPolicy


class XGenMM(FunctionCallingLLM):
    """xGen-MM (BLIP-3) v1.5 on the xgenmm engine: chat with images, tool calling, structured output.

    Examples:
        `pip install xgenmm[llamaindex]`

        ```python
        from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
        from llama_index.llms.xgenmm import XGenMM

        llm = XGenMM(model="Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5", allow_local_files=True)
        msg = ChatMessage(role="user", blocks=[ImageBlock(path="cat.png"), TextBlock(text="What is this?")])
        print(llm.chat([msg]).message.content)
        ```
    """

    model: str = Field(default=DEFAULT_MODEL_ID, description="Hugging Face model id or local checkpoint directory.")
    device: Optional[str] = Field(default=None, description="'cuda', 'cpu', 'cuda:1'...; None picks CUDA if present.")
    dtype: Optional[str] = Field(default=None, description="'bfloat16', 'float16', 'float32'; None = model default.")
    backend: Literal["native", "vllm"] = Field(
        default="native", description="'native' = the xgenmm engine; 'vllm' = vLLM with the xgenmm plugin "
        "(xgenmm.backends.get_engine)."
    )
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 = greedy (official demos).")
    max_tokens: int = Field(default=DEFAULT_NUM_OUTPUTS, gt=0, description="Most tokens generated per call.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling probability mass.")
    seed: Optional[int] = Field(default=None, description="Per-request sampling seed (reproducible sampling).")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    context_window: int = Field(default=DEFAULT_CONTEXT_WINDOW, gt=0, description="Model context, in tokens.")
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Engine options (max_num_seqs, kv_cache_memory_bytes, ...); they apply when the shared engine "
        "for (model, device, dtype) is first created.",
    )
    allow_remote_images: bool = Field(default=False, description="Fetch http(s) image URLs.")
    allow_local_files: bool = Field(default=False, description="Read images from local paths and file:// URLs.")
    allow_private_addresses: bool = Field(
        default=False, description="Let remote image URLs resolve to loopback / private addresses (SSRF guard off)."
    )
    local_file_roots: list[str] = Field(
        default_factory=list, description="If set, local image files must lie under one of these folders."
    )
    max_image_bytes: Optional[int] = Field(default=DEFAULT_MAX_IMAGE_BYTES, description="Largest image accepted.")
    image_fetch_timeout: float = Field(default=10.0, gt=0, description="Seconds allowed to fetch one remote image.")
    structured_outputs: Any = Field(
        default=None,
        description="A constraint applied to every call without tools: StructuredOutputsParams (or its dict), or a "
        "callable (messages) -> StructuredOutputsParams | None choosing one per call (see llamaindex_xgenmm.react).",
    )

    _engine: Optional[Engine] = PrivateAttr(default=None)
    _engine_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        return "XGenMM_llm"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model,
        )

    # ---- engine ----------------------------------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The engine, opened on first use (building an `XGenMM` is free). It is the process-wide one for
        (model, device, dtype): every `XGenMM`, reader or other front end on the same weights shares weights, KV cache
        and continuous batch. `.sync` is `xgenmm.LLM`-shaped, `.aio` `xgenmm.AsyncLLM`-shaped."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = get_engine(self.backend, model=self.model, device=self.device, dtype=self.dtype,
                                              **self.engine_options)
        return self._engine

    @property
    def image_policy(self) -> ImageInputPolicy:
        return ImageInputPolicy(
            allow_remote_images=self.allow_remote_images,
            allow_local_files=self.allow_local_files,
            allow_private_addresses=self.allow_private_addresses,
            local_file_roots=tuple(self.local_file_roots),
            max_image_bytes=self.max_image_bytes,
            fetch_timeout_s=self.image_fetch_timeout,
        )

    def get_tokenizer(self):
        return self.engine.sync.get_tokenizer()

    # ---- request translation ---------------------------------------------------------------------------------------
    def _request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any],
                 output_kind: RequestOutputKind) -> _Request:
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None) or None
        tool_choice = kwargs.pop("tool_choice", None)
        parallel = bool(kwargs.get("allow_parallel_tool_calls", False))
        if kwargs.pop("tool_required", False) and tool_choice in (None, "auto"):
            tool_choice = "required"
        policy = kwargs.pop("image_policy", None) or self.image_policy
        params = self._sampling_params(messages, kwargs, output_kind, has_tools=bool(tools))
        if tools:
            grammar = tool_call_structured_outputs(tools, tool_choice or "auto", parallel_tool_calls=parallel,
                                                   max_tokens=params.max_tokens)
            if grammar is not None:
                if params.structured_outputs is not None:
                    raise SamplingParamsError(
                        "structured_outputs cannot be combined with tools (the tool-call grammar constrains the reply)"
                    )
                params = _with_structured_outputs(params, grammar)
        return _Request(to_core_messages(messages), params, tools, policy)

    def _sampling_params(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any],
                         output_kind: RequestOutputKind, has_tools: bool) -> SamplingParams:
        """Instance defaults, then `sampling_params=`, then any SamplingParams field given by name. Other keyword
        arguments (LlamaIndex passes framework ones such as `allow_parallel_tool_calls`) are not model options."""
        explicit = kwargs.pop("sampling_params", None)
        options: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": list(self.stop) or None,
        }
        if explicit is not None:
            if not isinstance(explicit, SamplingParams):
                raise SamplingParamsError(f"sampling_params must be a SamplingParams, got {type(explicit).__name__}")
            options = {f.name: getattr(explicit, f.name) for f in dataclasses.fields(SamplingParams)}
        for name in list(kwargs):
            if name in _SAMPLING_FIELDS:
                options[name] = kwargs.pop(name)
        if options.get("structured_outputs") is None and not has_tools:
            default = self.structured_outputs
            options["structured_outputs"] = default(messages) if callable(default) else default
        options["output_kind"] = output_kind
        return SamplingParams(**options)

    # ---- chat ------------------------------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._request(messages, kwargs, RequestOutputKind.FINAL_ONLY)
        output = self.engine.sync.chat(request.messages, request.params, tools=request.tools,
                                       image_policy=request.policy)[0]
        return final_chat_response(output, self.model, request.tools)

    def chat_batch(self, conversations: Sequence[Sequence[ChatMessage]], **kwargs: Any) -> list[ChatResponse]:
        """Several conversations in one batched engine call (same options for all); responses in order."""
        requests = [self._request(c, kwargs, RequestOutputKind.FINAL_ONLY) for c in conversations]
        if not requests:
            return []
        first = requests[0]
        outputs = self.engine.sync.chat([r.messages for r in requests], [r.params for r in requests],
                                        tools=first.tools, image_policy=first.policy)
        return [final_chat_response(o, self.model, r.tools) for o, r in zip(outputs, requests)]

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = self._request(messages, kwargs, RequestOutputKind.DELTA)
        stream = self.engine.sync.chat_stream(request.messages, request.params, tools=request.tools,
                                              image_policy=request.policy)

        def gen() -> ChatResponseGen:
            text = ""
            try:
                for output in stream:
                    delta = output.outputs[0].text
                    text += delta
                    if output.finished:
                        yield final_chat_response(output, self.model, request.tools, text=text, delta=delta)
                    elif delta:
                        yield chunk_chat_response(output, self.model, text, delta)
            finally:
                stream.close()  # stopping early aborts the request and frees its KV blocks

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._request(messages, kwargs, RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in self.engine.aio.chat(request.messages, request.params, tools=request.tools,
                                                 image_policy=request.policy):
            final = output
        return final_chat_response(final, self.model, request.tools)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        request = self._request(messages, kwargs, RequestOutputKind.DELTA)
        engine = self.engine

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            stream = engine.aio.chat(request.messages, request.params, tools=request.tools,
                                     image_policy=request.policy)
            try:
                async for output in stream:
                    delta = output.outputs[0].text
                    text += delta
                    if output.finished:
                        yield final_chat_response(output, self.model, request.tools, text=text, delta=delta)
                    elif delta:
                        yield chunk_chat_response(output, self.model, text, delta)
            finally:
                await stream.aclose()  # cancelling / stopping early aborts the request

        return gen()

    # ---- completion (derived from chat) ----------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, image_documents: Optional[Sequence[Any]] = None,
                 **kwargs: Any) -> CompletionResponse:
        """Text completion; `image_documents=[ImageDocument | ImageNode | ImageBlock, ...]` is the legacy
        multimodal form (images go before the prompt, as in xGen-MM's training format)."""
        if image_documents:
            return chat_response_to_completion_response(self.chat(_image_prompt(prompt, image_documents), **kwargs))
        return chat_to_completion_decorator(self.chat)(prompt, **kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False,
                        image_documents: Optional[Sequence[Any]] = None, **kwargs: Any) -> CompletionResponseGen:
        if image_documents:
            return stream_chat_response_to_completion_response(
                self.stream_chat(_image_prompt(prompt, image_documents), **kwargs)
            )
        return stream_chat_to_completion_decorator(self.stream_chat)(prompt, **kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False,
                        image_documents: Optional[Sequence[Any]] = None, **kwargs: Any) -> CompletionResponse:
        if image_documents:
            response = await self.achat(_image_prompt(prompt, image_documents), **kwargs)
            return chat_response_to_completion_response(response)
        return await achat_to_completion_decorator(self.achat)(prompt, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               image_documents: Optional[Sequence[Any]] = None,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        if image_documents:
            from llama_index.core.base.llms.generic_utils import astream_chat_response_to_completion_response

            stream = await self.astream_chat(_image_prompt(prompt, image_documents), **kwargs)
            return astream_chat_response_to_completion_response(stream)
        return await astream_chat_to_completion_decorator(self.astream_chat)(prompt, **kwargs)

    # ---- function calling ------------------------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence["BaseTool"],
        user_msg: Optional[Union[str, ChatMessage]] = None,
        chat_history: Optional[list[ChatMessage]] = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`tool_required=True` (or `tool_choice="required"` / a tool name) makes the engine emit a call through a
        grammar: the tool name is one of the tools and the arguments match its JSON schema."""
        tool_specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        if tool_choice is None and tool_required:
            tool_choice = "required"
        return {
            "messages": messages,
            "tools": tool_specs or None,
            "tool_choice": tool_choice,
            "allow_parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def _validate_chat_with_tools_response(self, response: ChatResponse, tools: Sequence["BaseTool"],
                                           allow_parallel_tool_calls: bool = False, **kwargs: Any) -> ChatResponse:
        if not allow_parallel_tool_calls:
            _keep_first_tool_call(response)
        return response

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[ToolSelection]:
        message = response.message
        selections = [
            ToolSelection(tool_id=b.tool_call_id or b.tool_name, tool_name=b.tool_name,
                          tool_kwargs=b.tool_kwargs if isinstance(b.tool_kwargs, dict) else {})
            for b in message.blocks if isinstance(b, ToolCallBlock)
        ]
        if not selections:
            selections = [_selection_from_openai(c) for c in message.additional_kwargs.get("tool_calls") or []]
        if not selections and error_on_no_tool_call:
            invalid = message.additional_kwargs.get("invalid_tool_calls")
            detail = f"; invalid tool calls: {invalid}" if invalid else ""
            raise ValueError(f"Expected at least one tool call, but the model made none{detail}")
        return selections


def _with_structured_outputs(params: SamplingParams, structured: StructuredOutputsParams) -> SamplingParams:
    options = {f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams)}
    options["structured_outputs"] = structured
    return SamplingParams(**options)


def _image_prompt(prompt: str, image_documents: Sequence[Any]) -> list[ChatMessage]:
    blocks: list[Any] = [to_image_block(d) for d in image_documents]
    blocks.append(TextBlock(text=prompt))
    return [ChatMessage(role=MessageRole.USER, blocks=blocks)]


def _keep_first_tool_call(response: ChatResponse) -> None:
    message = response.message
    calls = message.additional_kwargs.get("tool_calls") or []
    if len(calls) > 1:
        message.additional_kwargs["tool_calls"] = calls[:1]
    seen = False
    kept = []
    for block in message.blocks:
        if isinstance(block, ToolCallBlock):
            if seen:
                continue
            seen = True
        kept.append(block)
    message.blocks = kept


def _selection_from_openai(call: dict[str, Any]) -> ToolSelection:
    import json

    fn = call.get("function", {})
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    return ToolSelection(tool_id=call.get("id") or fn.get("name"), tool_name=fn.get("name"), tool_kwargs=arguments)
