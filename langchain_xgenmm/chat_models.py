"""`ChatXGenMM`: xGen-MM (BLIP-3) as a LangChain chat model, on xgenmm's shared continuous-batching engine.

A thin translator, like langchain-ollama: LangChain messages -> OpenAI-shaped messages (`messages.py`), sampling
options -> `SamplingParams`, and the core's `RequestOutput` -> `AIMessage` / `AIMessageChunk`. Tool prompting, tool
call parsing and grammar-constrained decoding live in the core (`xgenmm.tools`, `xgenmm.schema_budget`,
`xgenmm.structured`), shared with the other front ends.

Concurrency: every instance with the same (model, device, dtype) uses one process-wide engine, loaded on the first
call (never in `__init__`). `invoke`/`stream` block in the calling thread while the engine loop batches;
`ainvoke`/`astream` await the asyncio engine directly (no thread pool); `batch` runs all inputs at once by default.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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

from xgenmm import DEFAULT_MODEL_ID, ImageInputPolicy, RequestOutputKind, SamplingParams, StructuredOutputsParams
from xgenmm.image_processing import DEFAULT_MAX_IMAGE_PIXELS
from xgenmm.multimodal.image_sources import DEFAULT_MAX_IMAGE_BYTES
from xgenmm.outputs import RequestOutput
from xgenmm.prompts import DEFAULT_SYSTEM_MESSAGE
from xgenmm.schema_budget import bound_json_schema
from xgenmm.tools import (
    ToolCallStreamParser,
    ToolStreamEvent,
    parse_tool_calls,
    resolve_tool_choice,
    tool_call_structured_outputs,
)

from .messages import to_core_messages

__all__ = ["ChatXGenMM"]

_ENGINE_INIT_LOCK = threading.RLock()

# Per-call kwargs that map straight onto SamplingParams (vLLM names).
_SAMPLING_KWARGS = ("temperature", "max_tokens", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "min_tokens")
# Accepted for API compatibility (agents, OpenAI-style callers) and deliberately ignored.
_IGNORED_KWARGS = ("strict", "timeout", "max_retries", "stream_options", "response_format", "n", "user")


@dataclass
class _Request:
    """One conversation ready for the engine, plus what is needed to read its reply."""

    messages: list[dict[str, Any]]
    params: SamplingParams
    tools: list[dict[str, Any]] | None  # rendered into the prompt, and used to parse the reply
    policy: ImageInputPolicy


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
    max_tokens: int | None = Field(default=512, description="new tokens per reply")
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
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

    _engine: Any = PrivateAttr(default=None)

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
    def _get_engine(self):
        """The shared engine (sync + asyncio faces), resolved on first use (once, even when `batch` threads all
        make their first call together)."""
        if self._engine is not None:
            return self._engine
        with _ENGINE_INIT_LOCK:
            return self._resolve_engine()

    def _resolve_engine(self):
        if self._engine is None:
            if self.backend == "native":
                from xgenmm import LLM, AsyncLLM
                from xgenmm.backends import Engine

                sync = LLM(self.model, device=self.device, dtype=self.dtype, **self.engine_options)
                aio = AsyncLLM(self.model, device=self.device, dtype=self.dtype, **self.engine_options)
                self._engine = Engine("native", sync, aio)
            else:
                from xgenmm.backends import get_engine

                self._engine = get_engine(self.backend, model=self.model, device=self.device, dtype=self.dtype,
                                          tensor_parallel_size=self.tensor_parallel_size, **self.engine_options)
        return self._engine

    def _engine_stats(self):
        """The shared engine's stats (`num_running`, `num_waiting`, `kv_cache_usage`, ...)."""
        return self._get_engine().sync.stats()

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Prompt length in text tokens (each image counts as its one `<image>` tag, not its vision tokens)."""
        tokenizer = self._get_engine().get_tokenizer()
        renderer = self._get_engine().sync.engine.chat_renderer
        text, _ = renderer.render_text(to_core_messages(messages), image_policy=self._image_policy(),
                                       tools=[convert_to_openai_tool(t) for t in tools] if tools else None)
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    def _image_policy(self) -> ImageInputPolicy:
        return ImageInputPolicy(
            allow_remote_images=self.allow_remote_images,
            allow_local_files=self.allow_local_files,
            allow_private_addresses=self.allow_private_addresses,
            local_file_roots=tuple(self.local_file_roots),
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            fetch_timeout_s=self.fetch_timeout_s,
        )

    # ---- request building -----------------------------------------------------------------------------------------
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any],
                 output_kind: RequestOutputKind) -> _Request:
        core_messages = to_core_messages(messages)
        sampling: dict[str, Any] = {
            "temperature": self.temperature, "max_tokens": self.max_tokens, "top_p": self.top_p, "seed": self.seed,
        }
        for name in _SAMPLING_KWARGS:
            if kwargs.get(name) is not None:
                sampling[name] = kwargs[name]
        sampling = {k: v for k, v in sampling.items() if v is not None}
        sampling.setdefault("temperature", 0.0)
        stops = list(stop if stop is not None else (kwargs.get("stop") or self.stop or []))
        max_tokens = sampling.get("max_tokens")

        tools = kwargs.get("tools") or None
        structured = kwargs.get("structured_output")
        constraint: StructuredOutputsParams | None = None
        if tools:
            mode, _ = resolve_tool_choice(kwargs.get("tool_choice"), tools)
            if mode == "none":
                tools = None
            else:
                constraint = tool_call_structured_outputs(
                    tools, kwargs.get("tool_choice"), parallel_tool_calls=bool(kwargs.get("parallel_tool_calls")),
                    constrain_auto=self.constrain_auto_tool_calls, max_tokens=max_tokens)
                if constraint is not None and mode == "required":
                    stops = []  # a stop string inside a forced call would cut it
        elif structured is not None:
            constraint = self._structured_constraint(structured, max_tokens)
            core_messages = _with_format_instruction(core_messages, structured)
            stops = []
        params = SamplingParams(stop=stops or None, output_kind=output_kind, structured_outputs=constraint, **sampling)
        return _Request(core_messages, params, tools, self._image_policy())

    @staticmethod
    def _structured_constraint(structured: Mapping[str, Any], max_tokens: int | None) -> StructuredOutputsParams:
        schema = structured.get("schema")
        if schema is None:
            return StructuredOutputsParams(json_object=True, whitespace_flexible=False)
        if max_tokens is not None:
            schema = bound_json_schema(schema, max_tokens).schema
        return StructuredOutputsParams(json=schema, whitespace_flexible=False)

    # ---- replies --------------------------------------------------------------------------------------------------
    def _usage(self, out: RequestOutput) -> UsageMetadata:
        metrics = out.metrics
        prompt = metrics.num_prompt_tokens if metrics else len(out.prompt_token_ids)
        generated = metrics.num_generated_tokens if metrics else sum(len(o.token_ids) for o in out.outputs)
        cached = metrics.num_cached_tokens if metrics else out.num_cached_tokens
        return UsageMetadata(input_tokens=prompt, output_tokens=generated, total_tokens=prompt + generated,
                             input_token_details={"cache_read": cached})

    def _metadata(self, out: RequestOutput) -> dict[str, Any]:
        completion = out.outputs[0]
        meta: dict[str, Any] = {"model_name": self.model, "model_provider": "xgenmm",
                                "finish_reason": completion.finish_reason}
        if completion.stop_reason is not None:
            meta["stop_reason"] = completion.stop_reason
        return meta

    def _message(self, out: RequestOutput, request: _Request) -> AIMessage:
        text = out.outputs[0].text
        usage = self._usage(out)
        meta = self._metadata(out)
        if not request.tools:
            return AIMessage(content=text, usage_metadata=usage, response_metadata=meta)
        reply = parse_tool_calls(text, request.tools)
        return AIMessage(
            content=reply.content,
            tool_calls=[tool_call(name=c.name, args=c.arguments, id=c.id) for c in reply.tool_calls],
            invalid_tool_calls=[invalid_tool_call(name=c.name, args=c.arguments, id=c.id, error=c.error)
                                for c in reply.invalid],
            usage_metadata=usage,
            response_metadata=meta,
        )

    # ---- sync -----------------------------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        request = self._prepare(messages, stop, kwargs, RequestOutputKind.FINAL_ONLY)
        out = self._get_engine().sync.chat(request.messages, request.params, tools=request.tools,
                                           image_policy=request.policy)[0]
        message = self._message(out, request)
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=self._metadata(out))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        request = self._prepare(messages, stop, kwargs, RequestOutputKind.DELTA)
        outputs = self._get_engine().sync.chat_stream(request.messages, request.params, tools=request.tools,
                                                      image_policy=request.policy)
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
        outputs = self._get_engine().aio.chat(request.messages, request.params, tools=request.tools,
                                              image_policy=request.policy)
        final = None
        try:
            async for out in outputs:
                final = out
        finally:
            await outputs.aclose()
        message = self._message(final, request)
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=self._metadata(final))])

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        request = self._prepare(messages, stop, kwargs, RequestOutputKind.DELTA)
        outputs = self._get_engine().aio.chat(request.messages, request.params, tools=request.tools,
                                              image_policy=request.policy)
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
        that the whole value fits `max_tokens` (see `xgenmm.schema_budget`).
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


def _with_format_instruction(messages: list[dict[str, Any]], structured: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Show the model the schema it must follow (decoding enforces it; the description tells it what to put where)."""
    schema = structured.get("schema")
    if schema is None:
        instruction = "Respond with a JSON object only."
    else:
        instruction = ("Respond with a JSON object only, matching this JSON schema:\n"
                       + json.dumps(schema, ensure_ascii=False))
    has_system = any(m.get("role") in ("system", "developer") for m in messages)
    prefix = [] if has_system else [{"role": "system", "content": DEFAULT_SYSTEM_MESSAGE}]
    return prefix + _append_system(messages, instruction)


def _append_system(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    # All system messages are joined into the one system turn, so appending one adds a line to it.
    return [*messages, {"role": "system", "content": instruction}]


class _ChunkAssembler:
    """Turns the engine's DELTA outputs into `ChatGenerationChunk`s: text as it comes, tool calls when complete,
    and a last chunk (`chunk_position="last"`) with usage and response metadata."""

    def __init__(self, model: ChatXGenMM, request: _Request) -> None:
        self.model = model
        self.parser = ToolCallStreamParser(request.tools) if request.tools else None
        self.final: RequestOutput | None = None
        self.num_calls = 0

    def feed(self, out: RequestOutput) -> list[ChatGenerationChunk]:
        if out.finished:
            self.final = out
        delta = out.outputs[0].text if out.outputs else ""
        if not delta:
            return []
        if self.parser is None:
            return [ChatGenerationChunk(message=AIMessageChunk(content=delta))]
        return [self._event_chunk(e) for e in self.parser.feed(delta)]

    def finish(self) -> list[ChatGenerationChunk]:
        chunks = [self._event_chunk(e) for e in self.parser.finish()] if self.parser is not None else []
        if self.final is None:
            return chunks
        meta = self.model._metadata(self.final)
        last = AIMessageChunk(content="", usage_metadata=self.model._usage(self.final), response_metadata=meta,
                              chunk_position="last")
        chunks.append(ChatGenerationChunk(message=last, generation_info=meta))
        return chunks

    def _event_chunk(self, event: ToolStreamEvent) -> ChatGenerationChunk:
        if event.text is not None:
            return ChatGenerationChunk(message=AIMessageChunk(content=event.text))
        index = self.num_calls
        self.num_calls += 1
        if event.tool_call is not None:
            call = event.tool_call
            piece = tool_call_chunk(name=call.name, args=json.dumps(call.arguments, ensure_ascii=False), id=call.id,
                                    index=index)
        else:
            bad = event.invalid
            piece = tool_call_chunk(name=bad.name, args=bad.arguments, id=bad.id, index=index)
        return ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[piece]))
