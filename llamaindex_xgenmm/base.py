"""`XGenMM`: xGen-MM (BLIP-3) as a LlamaIndex `FunctionCallingLLM`, multimodal through `ChatMessage.blocks`.

A thin adapter in the style of `llama-index-llms-ollama`: it translates messages, options and tool specs into the
core's `build_chat_request` (the same request builder as the HTTP server and the LangChain adapter) and the core's
replies (`xgenmm.chat.reply`) back into LlamaIndex types. The four chat methods are native; the `complete*` methods
are derived from them. Async methods run on the core's asyncio front end (no thread pool), so concurrent `achat`
calls join the engine's continuous batch. A required tool call is grammar-constrained, so it is always well formed;
`tool_choice="none"` shows the model no tools, as OpenAI does.
"""

from __future__ import annotations

import dataclasses
import warnings
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
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from xgenmm.chat import DEFAULT_MAX_TOKENS, ChatRequest, build_chat_request
from xgenmm.chat.request import OPENAI_SAMPLING_OPTIONS, VLLM_SAMPLING_OPTIONS, sampling_params_from_openai
from xgenmm.lazy_engine import EngineClients, LazyEngine
from xgenmm.checkpoint import DEFAULT_MODEL_ID
from xgenmm.errors import SamplingParamsError
from xgenmm.multimodal.image_processing import DEFAULT_MAX_IMAGE_PIXELS
from xgenmm.multimodal.image_sources import DEFAULT_MAX_IMAGE_BYTES, ImageInputPolicy, adapter_enable_hints
from xgenmm.sampling_params import RequestOutputKind, SamplingParams

from .messages import to_core_messages, to_image_block
from .responses import ChatStreamAssembler, final_chat_response

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

__all__ = ["XGenMM", "DEFAULT_CONTEXT_WINDOW"]

DEFAULT_CONTEXT_WINDOW = 4096  # Phi-3-mini-4k, the xGen-MM v1.5 language model
# The sampling options both adapters and the server take by name: OpenAI's, plus vLLM's extras.
_SAMPLING_OPTION_NAMES = frozenset(OPENAI_SAMPLING_OPTIONS + VLLM_SAMPLING_OPTIONS)


class XGenMM(FunctionCallingLLM):
    """xGen-MM (BLIP-3) v1.5 on the xgenmm engine: chat with images, tool calling, structured output.

    Examples:
        `pip install ".[llamaindex]"` (from a clone, after torch: README "Install")

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
        "(xgenmm.client.open_engine)."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs to split the model over (backend='vllm').")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 = greedy (official demos).")
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, gt=0, description="Most tokens generated per call.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling probability mass.")
    seed: Optional[int] = Field(default=None, description="Per-request sampling seed (reproducible sampling).")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    context_window: int = Field(default=DEFAULT_CONTEXT_WINDOW, gt=0, description="Model context, in tokens.")
    engine_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Engine options (max_num_seqs, kv_cache_memory_bytes, ...); part of the shared engine's key "
        "(xgenmm.client.open_engine): callers asking for other options get another engine.",
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
    max_image_pixels: Optional[int] = Field(default=DEFAULT_MAX_IMAGE_PIXELS,
                                            description="Most pixels an image may have (checked before decoding).")
    fetch_timeout_s: float = Field(default=10.0, gt=0, description="Seconds allowed to fetch one remote image.")
    image_fetch_timeout: Optional[float] = Field(
        default=None, gt=0, description="Deprecated name of fetch_timeout_s (the name the LangChain adapter uses).")
    structured_outputs: Any = Field(
        default=None,
        description="A constraint applied to every call without tools: StructuredOutputsParams (or its dict), or a "
        "callable (messages) -> StructuredOutputsParams | None choosing one per call (see llamaindex_xgenmm.react).",
    )

    _lazy_engine: LazyEngine = PrivateAttr(default_factory=LazyEngine)

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
    def _engine_arguments(self) -> dict[str, Any]:
        return dict(backend=self.backend, model=self.model, device=self.device, dtype=self.dtype,
                    tensor_parallel_size=self.tensor_parallel_size, **self.engine_options)

    @property
    def engine_clients(self) -> EngineClients:
        """The engine's clients, opened on first use through the front door (`xgenmm.client.open_engine`; building
        an `XGenMM` is free). Every `XGenMM`, reader or other front end asking for the same engine shares weights,
        KV cache and continuous batch. `.sync` is an `xgenmm.LLM`, `.aio` an `xgenmm.AsyncLLM`."""
        return self._lazy_engine.get(self._engine_arguments)

    @property
    def engine(self) -> EngineClients:
        """Deprecated name of `engine_clients` (kept for 0.2 callers)."""
        warnings.warn("XGenMM.engine is deprecated; use XGenMM.engine_clients", DeprecationWarning, stacklevel=2)
        return self.engine_clients

    @property
    def image_policy(self) -> ImageInputPolicy:
        if self.image_fetch_timeout is not None:
            warnings.warn("XGenMM(image_fetch_timeout=...) is deprecated; use fetch_timeout_s", DeprecationWarning,
                          stacklevel=2)
            return dataclasses.replace(self._policy(), fetch_timeout_s=self.image_fetch_timeout)
        return self._policy()

    def _policy(self) -> ImageInputPolicy:
        return ImageInputPolicy.from_settings(self).with_hints(adapter_enable_hints("XGenMM"))

    def get_tokenizer(self):
        return self.engine_clients.get_tokenizer()

    # ---- request translation ---------------------------------------------------------------------------------------
    def _request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any],
                 output_kind: RequestOutputKind) -> ChatRequest:
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None) or None
        tool_choice = kwargs.pop("tool_choice", None)
        if kwargs.pop("tool_required", False) and tool_choice in (None, "auto"):
            tool_choice = "required"
        parallel = bool(kwargs.pop("allow_parallel_tool_calls", False))
        policy = kwargs.pop("image_policy", None) or self.image_policy
        response_format = kwargs.pop("response_format", None)
        params = self._sampling_params(kwargs)
        default = self.structured_outputs
        structured = _constraint_for(default, messages, params.max_tokens) if callable(default) else default
        if isinstance(structured, dict):
            from xgenmm.sampling_params import StructuredOutputsParams

            structured = StructuredOutputsParams(**structured)
        return build_chat_request(
            to_core_messages(messages), sampling=params, tools=tools, tool_choice=tool_choice,
            parallel_tool_calls=parallel, response_format=response_format,
            structured_outputs=structured if params.structured_outputs is None else None,
            image_policy=policy, output_kind=output_kind)

    def _sampling_params(self, kwargs: dict[str, Any]) -> SamplingParams:
        """Instance defaults, then `sampling_params=` (a whole `SamplingParams`), then options by their OpenAI names
        (`temperature`, `top_p`, `max_tokens` / `max_completion_tokens`, `seed`, `stop`, `n`, `presence_penalty`,
        `frequency_penalty`, `logprobs` (bool) + `top_logprobs` (int)) or vLLM's extras (`top_k`, `min_p`,
        `repetition_penalty`, ...), exactly as `ChatXGenMM` and the server take them; `structured_outputs=` a
        constraint. A legacy integer `logprobs=k` still means k alternatives (`logprobs=True, top_logprobs=k`). Other
        keyword arguments (LlamaIndex passes framework ones) are not model options."""
        explicit = kwargs.pop("sampling_params", None)
        if explicit is not None:
            if not isinstance(explicit, SamplingParams):
                raise SamplingParamsError(f"sampling_params must be a SamplingParams, got {type(explicit).__name__}")
            options = {f.name: getattr(explicit, f.name) for f in dataclasses.fields(SamplingParams)}
        else:
            options = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                       "seed": self.seed, "stop": list(self.stop) or None}
        given = {name: kwargs.pop(name) for name in list(kwargs) if name in _SAMPLING_OPTION_NAMES}
        if "structured_outputs" in kwargs:
            options["structured_outputs"] = kwargs.pop("structured_outputs")
        legacy = given.get("logprobs")
        if isinstance(legacy, int) and not isinstance(legacy, bool):  # vLLM's meaning: how many alternatives
            given["logprobs"], given["top_logprobs"] = True, given.get("top_logprobs", legacy)
        if given:
            mapped = sampling_params_from_openai(given, output_kind=options.get("output_kind", RequestOutputKind.FINAL_ONLY))
            for name in given:
                field = {"max_completion_tokens": "max_tokens", "top_logprobs": "logprobs"}.get(name, name)
                options[field] = getattr(mapped, field)
        return SamplingParams(**options)

    # ---- chat ------------------------------------------------------------------------------------------------------
    def _final(self, output, request: ChatRequest) -> ChatResponse:
        tokenizer = self.get_tokenizer() if request.params.logprobs is not None else None
        return final_chat_response(output, self.model, request.tools, tokenizer=tokenizer)

    def _assembler(self, request: ChatRequest) -> ChatStreamAssembler:
        want = request.params.logprobs is not None
        return ChatStreamAssembler(self.model, request.tools, self.get_tokenizer() if want else None, want)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._request(messages, kwargs, RequestOutputKind.FINAL_ONLY)
        output = self.engine_clients.sync.chat(request)[0]
        return self._final(output, request)

    def chat_batch(self, conversations: Sequence[Sequence[ChatMessage]], **kwargs: Any) -> list[ChatResponse]:
        """Several conversations in one batched engine call (same options for all); responses in order."""
        requests = [self._request(c, kwargs, RequestOutputKind.FINAL_ONLY) for c in conversations]
        if not requests:
            return []
        outputs = self.engine_clients.sync.chat(requests)
        return [self._final(o, r) for o, r in zip(outputs, requests)]

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = self._request(messages, kwargs, RequestOutputKind.DELTA)
        stream = self.engine_clients.sync.chat_stream(request)
        assembler = self._assembler(request)

        def gen() -> ChatResponseGen:
            try:
                for output in stream:
                    response = assembler.feed(output)
                    if response is not None:
                        yield response
            finally:
                stream.close()  # stopping early aborts the request and frees its KV blocks

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._request(messages, kwargs, RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in self.engine_clients.aio.chat(request):
            final = output
        return self._final(final, request)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        request = self._request(messages, kwargs, RequestOutputKind.DELTA)
        clients = self.engine_clients
        assembler = self._assembler(request)

        async def gen() -> ChatResponseAsyncGen:
            stream = clients.aio.chat(request)
            try:
                async for output in stream:
                    response = assembler.feed(output)
                    if response is not None:
                        yield response
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


def _constraint_for(choose: Any, messages: Sequence[ChatMessage], max_tokens: Optional[int]) -> Any:
    """Call a per-call constraint chooser; one that takes `max_tokens` (e.g. `ReActConstraint`) gets the call's, so
    its limits fit the reply it constrains."""
    import inspect

    try:
        takes_budget = "max_tokens" in inspect.signature(choose).parameters
    except (TypeError, ValueError):
        takes_budget = False
    return choose(messages, max_tokens=max_tokens) if takes_budget else choose(messages)


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
