"""One chat request, built once for every front end: OpenAI-shaped messages + tools + `tool_choice` +
`parallel_tool_calls` + `response_format` / structured output + sampling options -> the messages to render, the
tools the prompt shows, the image policy and the `SamplingParams` (grammar, token budget, stop strings included).

The HTTP server, `ChatXGenMM` (LangChain), `XGenMM` (LlamaIndex) and the vLLM backend all call `build_chat_request`
and only translate their framework's types into its arguments, so the same request gives the same prompt ids, the
same sampling parameters and the same tokens whichever way it came in. Where front ends used to differ, OpenAI's
behaviour is the rule:

* `tool_choice="none"` renders no tools (the model is not shown what it may not call);
* a forced call ("required" / "any" / a name) is grammar-constrained, bounded to `max_tokens`, and runs without stop
  strings (one inside the call's JSON would cut it);
* with `tool_choice="auto"`, a `response_format` (if any) decides the output; otherwise a call the model starts is
  held to the tool-call grammar (`constrain_auto_tool_calls`);
* `response_format` json_schema / json_object: decoding is held to the schema (bounded so the whole value fits
  `max_tokens`, `xgenmm.structured.schema_budget`), the model is shown the schema in the system turn, and stop
  strings are dropped;
* the reply's finish reason is "tool_calls" when it holds tool calls (`xgenmm.chat.reply`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import PromptError, SamplingParamsError, SchemaTooComplexError
from ..multimodal.image_sources import ImageInputPolicy
from ..sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from ..structured.schema_budget import bound_json_schema
from ..tool_calls import normalize_tools, resolve_tool_choice, tool_call_structured_outputs
from .template import DEFAULT_SYSTEM_MESSAGE

__all__ = [
    "ChatRequest",
    "ResponseFormat",
    "build_chat_request",
    "response_format_from_openai",
    "sampling_params_from_openai",
    "DEFAULT_MAX_TOKENS",
    "CAPTION_MAX_TOKENS",
    "OPENAI_SAMPLING_OPTIONS",
    "VLLM_SAMPLING_OPTIONS",
]

# OpenAI chat-completions sampling fields, and vLLM's extras (what `extra_body` carries); anything else a front end
# passes is a `SamplingParamsError` naming it.
# The reply budget of the interactive front ends (`xgenmm chat`, `ChatXGenMM`, `XGenMM`): room for a detailed answer
# about an image while leaving most of the 4k context to the prompt (an image costs 128 tokens a view, up to 5 views).
# `xgenmm caption` uses CAPTION_MAX_TOKENS (a caption is embedded for retrieval: short and focused); the HTTP server
# follows OpenAI's contract (no max_tokens = until the context is full; `xgenmm serve --max-tokens-default`).
DEFAULT_MAX_TOKENS = 512
CAPTION_MAX_TOKENS = 128

OPENAI_SAMPLING_OPTIONS = ("temperature", "top_p", "n", "seed", "stop", "max_tokens", "max_completion_tokens",
                           "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs")
VLLM_SAMPLING_OPTIONS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                         "skip_special_tokens", "include_stop_str_in_output")


@dataclass(frozen=True)
class ResponseFormat:
    """What the reply must be: "text" (free), "json_object" (any JSON object) or "json_schema" (`schema`)."""

    type: str = "text"
    schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.type not in ("text", "json_object", "json_schema"):
            raise PromptError(f"response_format type {self.type!r} is not supported; use 'text', 'json_object' or "
                              "'json_schema'")
        if self.type == "json_schema" and not isinstance(self.schema, dict):
            raise PromptError("response_format json_schema needs a JSON schema object")


@dataclass(frozen=True)
class ChatRequest:
    """One chat request, built once (`build_chat_request`) and handed down whole: `LLM.chat(request)`,
    `LLM.chat_stream(request)`, `AsyncLLM.chat(request)`; the engine's client renders it (`EngineHandle.prepare_chat`)."""

    messages: list[dict[str, Any]]
    params: SamplingParams
    tools: list[dict[str, Any]] | None = None  # shown in the prompt and used to parse the reply; None with "none"
    tool_choice: str = "none"  # resolved: "none" | "auto" | "required"
    image_policy: ImageInputPolicy | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


def response_format_from_openai(response_format: Mapping[str, Any] | None) -> ResponseFormat:
    """OpenAI's `response_format` object (`{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`,
    `{"type": "json_object"}`, `{"type": "text"}`) -> `ResponseFormat`."""
    if response_format is None:
        return ResponseFormat()
    if not isinstance(response_format, Mapping):
        raise PromptError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type") or "text"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise PromptError("response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}}")
        return ResponseFormat("json_schema", dict(schema))
    return ResponseFormat(str(kind))


def sampling_params_from_openai(options: Mapping[str, Any], *, output_kind: RequestOutputKind) -> SamplingParams:
    """OpenAI / vLLM option names -> `SamplingParams` (absent or None options keep SamplingParams' defaults).

    As in OpenAI's API, no `max_tokens` means no limit but the context (None, not vLLM's 16);
    `max_completion_tokens` wins over `max_tokens`; OpenAI's `logprobs` (bool) + `top_logprobs` (int) become
    vLLM's `logprobs` (how many alternatives, or None for none). Unknown names raise `SamplingParamsError`."""
    unknown = sorted(set(options) - set(OPENAI_SAMPLING_OPTIONS) - set(VLLM_SAMPLING_OPTIONS))
    if unknown:
        raise SamplingParamsError(f"unknown sampling option(s): {', '.join(repr(u) for u in unknown)}",
                                  field=unknown[0])
    values = {k: v for k, v in options.items() if v is not None}
    values["max_tokens"] = values.pop("max_completion_tokens", values.get("max_tokens"))
    logprobs = values.pop("logprobs", False)
    top_logprobs = values.pop("top_logprobs", None)
    if top_logprobs is not None and not logprobs:
        raise SamplingParamsError("invalid sampling option top_logprobs: it needs logprobs=True", field="top_logprobs")
    values["logprobs"] = (top_logprobs or 0) if logprobs else None
    return SamplingParams(output_kind=output_kind, **values)


def build_chat_request(
    messages: Sequence[Mapping[str, Any]],
    *,
    sampling: SamplingParams | Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    response_format: ResponseFormat | Mapping[str, Any] | None = None,
    structured_outputs: StructuredOutputsParams | None = None,
    image_policy: ImageInputPolicy | None = None,
    output_kind: RequestOutputKind | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    constrain_auto_tool_calls: bool = True,
) -> ChatRequest:
    """Build the request every front end sends (see the module docstring for the rules).

    `sampling` is a `SamplingParams` or a mapping of OpenAI / vLLM option names; `output_kind` overrides its output
    kind (streaming front ends ask for DELTA). `structured_outputs` is a raw engine constraint (vLLM's extra, or
    LlamaIndex's `structured_outputs` option): used when neither a response format nor a tool call decides the
    output, with no prompt instruction. Raises `PromptError` / `SamplingParamsError` naming what is wrong.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise PromptError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    params = _sampling(sampling, output_kind)
    fmt = response_format if isinstance(response_format, ResponseFormat) else response_format_from_openai(response_format)
    messages = [dict(m) if isinstance(m, Mapping) else m for m in messages]

    normalized = normalize_tools(tools) if tools else []
    mode, _ = resolve_tool_choice(tool_choice, normalized) if normalized else ("none", None)
    constraint: StructuredOutputsParams | None = None
    drop_stops = False
    if mode == "required" or (mode == "auto" and fmt.type == "text"):
        constraint = tool_call_structured_outputs(normalized, tool_choice, parallel_tool_calls=bool(parallel_tool_calls),
                                                  constrain_auto=constrain_auto_tool_calls, max_tokens=params.max_tokens)
        drop_stops = constraint is not None and mode == "required"
    if constraint is None and fmt.type != "text":
        constraint = _format_constraint(fmt, params.max_tokens)
        messages = _with_format_instruction(messages, fmt)
        drop_stops = True
    if constraint is None and structured_outputs is not None:
        if not isinstance(structured_outputs, StructuredOutputsParams):
            raise SamplingParamsError("structured_outputs must be a StructuredOutputsParams", field="structured_outputs")
        constraint = structured_outputs
    if constraint is None:
        constraint = params.structured_outputs
    elif params.structured_outputs is not None and params.structured_outputs != constraint:
        raise SamplingParamsError("structured_outputs cannot be combined with a response_format or a forced tool "
                                  "call (each constrains the reply)", field="structured_outputs")
    changes: dict[str, Any] = {"structured_outputs": constraint}
    if drop_stops:
        changes["stop"] = None
    params = params.replace(**changes)
    return ChatRequest(
        messages=messages,
        params=params,
        tools=normalized if mode != "none" else None,
        tool_choice=mode,
        image_policy=image_policy,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
    )


def _sampling(sampling: SamplingParams | Mapping[str, Any] | None, output_kind: RequestOutputKind | None) -> SamplingParams:
    if sampling is None:
        params = SamplingParams()
    elif isinstance(sampling, SamplingParams):
        params = sampling
    elif isinstance(sampling, Mapping):
        params = sampling_params_from_openai(sampling, output_kind=output_kind or RequestOutputKind.FINAL_ONLY)
    else:
        raise SamplingParamsError(f"sampling must be a SamplingParams or a mapping of options, got "
                                  f"{type(sampling).__name__}", field=None)
    if output_kind is not None and params.output_kind is not output_kind:
        params = params.replace(output_kind=output_kind)
    return params


def _format_constraint(fmt: ResponseFormat, max_tokens: int | None) -> StructuredOutputsParams:
    # Compact JSON: the model cannot wander into endless whitespace between tokens.
    if fmt.type == "json_object" or fmt.schema is None:
        return StructuredOutputsParams(json_object=True, whitespace_flexible=False)
    schema = fmt.schema
    if max_tokens is not None:
        try:
            schema = bound_json_schema(schema, max_tokens).schema
        except SchemaTooComplexError as exc:
            raise SchemaTooComplexError(f"response_format: {exc}", field="response_format") from None
    return StructuredOutputsParams(json=schema, whitespace_flexible=False)


def _with_format_instruction(messages: list[dict[str, Any]], fmt: ResponseFormat) -> list[dict[str, Any]]:
    """Show the model the format it must follow (decoding enforces it; the description says what goes where). All
    system messages are joined into the one system turn, so an appended one adds a line to it."""
    if fmt.schema is None:
        instruction = "Respond with a JSON object only."
    else:
        instruction = "Respond with a JSON object only, matching this JSON schema:\n" + json.dumps(fmt.schema,
                                                                                                  ensure_ascii=False)
    has_system = any(m.get("role") in ("system", "developer") for m in messages if isinstance(m, Mapping))
    prefix = [] if has_system else [{"role": "system", "content": DEFAULT_SYSTEM_MESSAGE}]
    return prefix + messages + [{"role": "system", "content": instruction}]
