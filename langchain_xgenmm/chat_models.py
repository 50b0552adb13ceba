"""`ChatXGenMM`: xGen-MM (BLIP-3) as a LangChain chat model, on xgenmm's shared continuous-batching engine.

A thin translator, like langchain-ollama: LangChain messages -> OpenAI-shaped messages (`messages.py`), its options
-> the core's `build_chat_request` (the same request builder as the HTTP server and the LlamaIndex adapter: tools,
tool_choice, structured output, sampling), and the core's replies (`xgenmm.chat.reply`: prose, tool calls, finish
reason, usage) -> `AIMessage` / `AIMessageChunk`.

Concurrency: every instance with the same (model, device, dtype) uses one process-wide engine, loaded on the first
call (never in `__init__`). `invoke`/`stream` block in the calling thread while the engine loop batches;
`ainvoke`/`astream` await the asyncio engine directly (no thread pool); `batch` runs all inputs at once by default.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr

from xgenmm import DEFAULT_MODEL_ID, ImageInputPolicy, RequestOutputKind
from xgenmm.chat import DEFAULT_MAX_TOKENS, ChatRequest, ChoiceStream, ReplyEvent, ResponseFormat, build_chat_request, chat_choice, usage_of
from xgenmm.chat.reply import TokenPieces, logprobs_content
from xgenmm.chat.request import OPENAI_SAMPLING_OPTIONS, VLLM_SAMPLING_OPTIONS
from xgenmm.lazy_engine import EngineClients, LazyEngine
from xgenmm.multimodal.image_processing import DEFAULT_MAX_IMAGE_PIXELS
from xgenmm.multimodal.image_sources import DEFAULT_MAX_IMAGE_BYTES, adapter_enable_hints
from xgenmm.outputs import CompletionOutput, RequestOutput
from xgenmm.tool_calls import resolve_tool_choice

from .messages import to_core_messages

__all__ = ["ChatXGenMM"]


# Per-call kwargs that are sampling options (OpenAI / vLLM names, as `build_chat_request` takes them).
# The same names `XGenMM` (LlamaIndex) and the server take; `stop` is merged with the call's `stop` argument.
_SAMPLING_KWARGS = tuple(n for n in OPENAI_SAMPLING_OPTIONS + VLLM_SAMPLING_OPTIONS if n != "stop")


class ChatXGenMM(BaseChatModel):
    """Salesforce xGen-MM (BLIP-3) v1.5 chat model: images + text in, text / tool calls / structured output out.

    ```python
    from langchain_xgenmm import ChatXGenMM

    llm = ChatXGenMM(model="Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5", max_tokens=256)
    llm.invoke([HumanMessage(content=[{"type": "image", "base64": b64, "mime_type": "image/png"},
                                      {"type": "text", "text": "What is in this picture?"}])])
    ```
    """

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    model: str = Field(default=DEFAULT_MODEL_ID, description="local checkpoint folder or Hugging Face model id")
    device: str | None = Field(default=None, description='"cuda", "cpu", ...; default: CUDA when available')
    dtype: str | None = Field(default=None, description='"bfloat16", "float16", "float32"; default: the device\'s best')
    temperature: float | None = Field(default=None, description="sampling temperature; None = greedy (the official demos)")
    max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, description="new tokens per reply")
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, description="replies per prompt (one ChatGeneration each; not when streaming)")
    logprobs: bool | None = Field(default=None, description="return token logprobs in response_metadata['logprobs']")
    top_logprobs: int | None = Field(default=None, description="alternatives per position (needs logprobs=True)")
    streaming: bool = False
    engine_options: dict[str, Any] = Field(default_factory=dict,
                                           description="options for the shared engine, applied when it is first created")
    backend: Literal["native", "vllm"] = "native"
    tensor_parallel_size: int = 1

    # Image input policy (closed by default; see xgenmm.multimodal.image_sources).
    allow_remote_images: bool = False
    allow_local_files: bool = False
    allow_private_addresses: bool = False
    local_file_roots: list[str] = Field(default_factory=list)
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    fetch_timeout_s: float = 10.0

    constrain_auto_tool_calls: bool = Field(
        default=True, description="with tool_choice auto, constrain decoding so that any tool call is well-formed")

    _lazy_engine: LazyEngine = PrivateAttr(default_factory=LazyEngine)

    # ---- LangChain identity ---------------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "xgenmm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "dtype": self.dtype, "backend": self.backend,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p,
                "seed": self.seed, "stop": self.stop}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "xgenmm"
        params["ls_model_name"] = kwargs.get("model", self.model)
        params["ls_model_type"] = "chat"
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ---- engine ---------------------------------------------------------------------------------------------------
    def _engine_clients(self) -> EngineClients:
        """The engine's clients (`.sync` an `xgenmm.LLM`, `.aio` an `xgenmm.AsyncLLM`), opened on first use through
        the front door (`xgenmm.client.open_engine`; once, even when `batch` threads all make their first call
        together)."""
        return self._lazy_engine.get(self._engine_arguments)

    def _engine_arguments(self) -> dict[str, Any]:
        return dict(backend=self.backend, model=self.model, device=self.device, dtype=self.dtype,
                    tensor_parallel_size=self.tensor_parallel_size, **self.engine_options)

    def _engine_stats(self):
        """The shared engine's stats (`num_running`, `num_waiting`, `kv_cache_usage`, ...)."""
        return self._engine_clients().handle.stats()

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Prompt length in text tokens (each image counts as its one `<image>` tag, not its vision tokens)."""
        handle = self._engine_clients().handle
        tokenizer, renderer = handle.tokenizer, handle.chat_renderer
        text, _ = renderer.render_text(to_core_messages(messages), image_policy=self._image_policy(),
                                       tools=[convert_to_openai_tool(t) for t in tools] if tools else None)
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    def _image_policy(self) -> ImageInputPolicy:
        return ImageInputPolicy.from_settings(self).with_hints(adapter_enable_hints("ChatXGenMM"))

    # ---- request building -----------------------------------------------------------------------------------------
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any],
                 output_kind: RequestOutputKind) -> ChatRequest:
        sampling: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p,
                                    "seed": self.seed, "n": self.n, "logprobs": self.logprobs,
                                    "top_logprobs": self.top_logprobs}
        sampling.update({name: kwargs[name] for name in _SAMPLING_KWARGS if kwargs.get(name) is not None})
        if sampling["temperature"] is None:
            sampling["temperature"] = 0.0  # greedy, as the official demos
        sampling["stop"] = list(stop if stop is not None else (kwargs.get("stop") or self.stop or [])) or None
        if output_kind is RequestOutputKind.DELTA and (sampling.get("n") or 1) > 1:
            raise ValueError("n > 1 is not supported when streaming")
        structured = kwargs.get("structured_output")
        response_format = None
        if structured is not None:
            schema = structured.get("schema")
            response_format = ResponseFormat("json_schema", schema) if schema is not None else ResponseFormat("json_object")
        return build_chat_request(
            to_core_messages(messages), sampling=sampling, tools=kwargs.get("tools") or None,
            tool_choice=kwargs.get("tool_choice"), parallel_tool_calls=kwargs.get("parallel_tool_calls"),
            response_format=response_format, image_policy=self._image_policy(), output_kind=output_kind,
            constrain_auto_tool_calls=self.constrain_auto_tool_calls)

    # ---- replies --------------------------------------------------------------------------------------------------
    def _usage(self, out: RequestOutput) -> UsageMetadata:
        usage = usage_of(out)
        return UsageMetadata(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                             total_tokens=usage.total_tokens, input_token_details={"cache_read": usage.cached_tokens})

    def _metadata(self, completion: CompletionOutput, finish_reason: str | None, request: ChatRequest) -> dict[str, Any]:
        meta: dict[str, Any] = {"model_name": self.model, "model_provider": "xgenmm", "finish_reason": finish_reason}
        if completion.stop_reason is not None:
            meta["stop_reason"] = completion.stop_reason
        if request.params.logprobs is not None and completion.logprobs is not None:
            pieces = TokenPieces(self._engine_clients().get_tokenizer())
            meta["logprobs"] = {"content": logprobs_content(completion.token_ids, completion.logprobs,
                                                            request.params.logprobs, pieces)}
        return meta

    def _generations(self, out: RequestOutput, request: ChatRequest) -> list[ChatGeneration]:
        usage = self._usage(out)
        generations = []
        for completion in out.outputs:
            reply = chat_choice(completion, request.tools)
            meta = self._metadata(completion, reply.finish_reason, request)
            message = AIMessage(
                content=reply.content or "",
                tool_calls=[tool_call(name=c.name, args=c.arguments, id=c.id) for c in reply.tool_calls],
                invalid_tool_calls=[invalid_tool_call(name=c.name, args=c.arguments, id=c.id, error=c.error)
                                    for c in reply.invalid_tool_calls],
                usage_metadata=usage,
                response_metadata=meta,
            )
            generations.append(ChatGeneration(message=message, generation_info=meta))
        return generations

    # ---- sync -----------------------------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        request = self._prepare(messages, stop, kwargs, RequestOutputKind.FINAL_ONLY)
        out = self._engine_clients().sync.chat(request)[0]
        return ChatResult(generations=self._generations(out, request))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        request = self._prepare(messages, stop, kwargs, RequestOutputKind.DELTA)
        outputs = self._engine_clients().sync.chat_stream(request)
        assembler = _ChunkAssembler(self, request)
        try:
            for out in outputs:
                for chunk in assembler.feed(out):
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        finally:
            outputs.close()  # stopping early aborts the request and frees its KV blocks
        for chunk in assembler.finish():
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # ---- asyncio --------------------------------------------------------------------------------------------------
    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        request = self._prepare(messages, stop, kwargs, RequestOutputKind.FINAL_ONLY)
        outputs = self._engine_clients().aio.chat(request)
        final = None
        try:
            async for out in outputs:
                final = out
        finally:
            await outputs.aclose()
        return ChatResult(generations=self._generations(final, request))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        request = self._prepare(messages, stop, kwargs, RequestOutputKind.DELTA)
        outputs = self._engine_clients().aio.chat(request)
        assembler = _ChunkAssembler(self, request)
        try:
            async for out in outputs:
                for chunk in assembler.feed(out):
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        finally:
            await outputs.aclose()  # cancelled or closed early: the engine aborts the request
        for chunk in assembler.finish():
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # ---- batching -------------------------------------------------------------------------------------------------
    def batch(self, inputs: list[LanguageModelInput], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[BaseMessage]:
        """All inputs reach the engine at once (the default thread pool would cap them at a few): the engine
        batches them continuously. Pass `max_concurrency` in the config to limit."""
        if not inputs:
            return []
        configs = get_config_list(config, len(inputs))
        configs = [c if c.get("max_concurrency") is not None else {**c, "max_concurrency": len(inputs)} for c in configs]
        return super().batch(inputs, configs, return_exceptions=return_exceptions, **kwargs)

    # ---- tools and structured output ------------------------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        strict: bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (anything `convert_to_openai_tool` takes). `tool_choice`: None / "auto" (the model decides; a
        call it starts is grammar-constrained to be valid), "none", "any" / "required" / True (must call one), or a
        tool name (must call that one). `strict` is accepted and ignored: calls are always decoded under the tool's
        JSON schema. `parallel_tool_calls=True` lets one reply hold several calls."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            resolve_tool_choice(tool_choice, formatted)  # fail at bind time for an unknown name
        return super().bind(tools=formatted, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                            **kwargs)

    def with_structured_output(
        self,
        schema: dict | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """Structured output under grammar-constrained decoding (valid JSON for the schema, even from a weak model).

        * "json_schema" (default): the reply is a JSON value of `schema`; the schema is also shown to the model.
        * "function_calling": `schema` becomes a tool that the model must call.
        * "json_mode": the prompt describes the format; decoding is held to the schema when one is given (else to
          any JSON object).
        Pydantic classes come back as instances, TypedDicts and JSON schemas as dicts; `include_raw=True` gives
        `{"raw", "parsed", "parsing_error"}`. Limits: a schema's open-ended strings / numbers / arrays are bounded so
        that the whole value fits `max_tokens` (see `xgenmm.structured.schema_budget`).
        """
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        if method == "function_calling":
            if schema is None:
                raise ValueError("method='function_calling' needs a schema")
            tool_name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=tool_name, ls_structured_output_format=ls_format)
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                                else JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            if schema is None and method == "json_schema":
                raise ValueError("method='json_schema' needs a schema")
            json_schema = convert_to_json_schema(schema) if schema is not None else None
            if json_schema is not None and "type" not in json_schema and "properties" in json_schema:
                json_schema = {**json_schema, "type": "object"}
            bound: dict[str, Any] = {"structured_output": {"method": method, "schema": json_schema}}
            if schema is not None:
                bound["ls_structured_output_format"] = ls_format
            llm = self.bind(**bound)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"unknown method {method!r}; use 'json_schema', 'function_calling' or 'json_mode'")
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        no_parse = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([no_parse], exception_key="parsing_error")


class _ChunkAssembler:
    """Turns the engine's DELTA outputs into `ChatGenerationChunk`s (through the core's `ChoiceStream`): text as it
    comes, tool calls when complete, and a last chunk (`chunk_position="last"`) with usage and response metadata."""

    def __init__(self, model: ChatXGenMM, request: ChatRequest) -> None:
        self.model = model
        self.request = request
        self.stream = ChoiceStream(request.tools)
        self.final: RequestOutput | None = None
        self.finish_reason: str | None = None
        self.completion = CompletionOutput(0, "", [], None, [] if request.params.logprobs is not None else None, None)

    def feed(self, out: RequestOutput) -> list[ChatGenerationChunk]:
        if out.finished:
            self.final = out
        if not out.outputs:
            return []
        delta = out.outputs[0]
        self._accumulate(delta)
        chunks = []
        for event in self.stream.feed(delta):
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
            else:
                chunks.append(self._event_chunk(event))
        return chunks

    def finish(self) -> list[ChatGenerationChunk]:
        if self.final is None:
            return []
        meta = self.model._metadata(self.completion, self.finish_reason, self.request)
        last = AIMessageChunk(content="", usage_metadata=self.model._usage(self.final), response_metadata=meta,
                              chunk_position="last")
        return [ChatGenerationChunk(message=last, generation_info=meta)]

    def _accumulate(self, delta: CompletionOutput) -> None:
        """The whole sample so far (for the last chunk's metadata: stop reason, logprobs)."""
        done = self.completion
        done.token_ids.extend(delta.token_ids)
        if done.logprobs is not None and delta.logprobs:
            done.logprobs.extend(delta.logprobs)
        done.finish_reason = delta.finish_reason or done.finish_reason
        done.stop_reason = delta.stop_reason if delta.finish_reason else done.stop_reason

    @staticmethod
    def _event_chunk(event: ReplyEvent) -> ChatGenerationChunk:
        if event.text is not None:
            return ChatGenerationChunk(message=AIMessageChunk(content=event.text))
        if event.tool_call is not None:
            call = event.tool_call
            piece = tool_call_chunk(name=call.name, args=json.dumps(call.arguments, ensure_ascii=False), id=call.id,
                                    index=event.tool_call_index)
        else:
            bad = event.invalid_tool_call
            piece = tool_call_chunk(name=bad.name, args=bad.arguments, id=bad.id, index=event.tool_call_index)
        return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[piece]))
