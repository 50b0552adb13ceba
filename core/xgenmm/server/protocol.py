"""`/v1/chat/completions` request bodies -> a validated `ChatCompletionRequest` (OpenAI names, vLLM extras).

Validation here names the offending field in the OpenAI error's `param`, so a client sees exactly what to fix. The
request itself (tools, tool_choice, response_format, sampling) is built by the core's `build_chat_request`, as for
every other front end; its errors are mapped back to the OpenAI field names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..chat.request import (
    OPENAI_SAMPLING_OPTIONS,
    VLLM_SAMPLING_OPTIONS,
    ChatRequest,
    build_chat_request,
    response_format_from_openai,
)
from ..errors import PromptError, SamplingParamsError
from ..sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams
from .errors import OpenAIError

# Fields a client may send that change nothing here (OpenAI bookkeeping).
IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "verbosity",
    "function_call", "functions",
})
# vLLM-style sampling extras (sent with `extra_body` by the openai client).
EXTRA_SAMPLING_FIELDS = VLLM_SAMPLING_OPTIONS
# vLLM-style chat extras: render options and token ids in the response.
EXTRA_CHAT_FIELDS = ("add_generation_prompt", "continue_final_message", "return_token_ids")
KNOWN_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
    "max_completion_tokens", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
    "tools", "tool_choice", "parallel_tool_calls", "response_format", "logit_bias", "modalities",
    *EXTRA_SAMPLING_FIELDS, *EXTRA_CHAT_FIELDS,
}) | IGNORED_FIELDS

# SamplingParams names -> the request field a client sets.
_OPENAI_PARAM_NAMES = {"logprobs": "top_logprobs", "structured_outputs": "response_format"}


@dataclass
class ChatCompletionRequest:
    model: str
    chat: ChatRequest  # the core request: messages, params, tools, render options
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    num_images: int = 0
    return_token_ids: bool = False  # vLLM's extension: `prompt_token_ids` in the response, `token_ids` per choice
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sampling(self) -> SamplingParams:
        return self.chat.params

    @property
    def tools(self) -> list[dict] | None:
        return self.chat.tools

    @property
    def tool_choice(self) -> str:
        return self.chat.tool_choice

    @property
    def wants_tool_calls(self) -> bool:
        return self.chat.tools is not None


def _bad(message: str, param: str | None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, 400, param=param, code=code)


def _expect(body: dict, name: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types:
        raise _bad(f"'{name}' must be {what}, got a boolean", name)
    if not isinstance(value, types):
        raise _bad(f"'{name}' must be {what}, got {type(value).__name__}", name)
    return value


MAX_JSON_DEPTH = 32  # a chat request nests ~6 deep (messages / content / image_url / ...); schemas a little more


def parse_json_body(raw: bytes) -> dict:
    """The body as a JSON object; malformed or absurdly nested bodies are a 400, never a RecursionError."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    except RecursionError:
        raise _bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_json")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise _bad(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
    return body


def json_depth(value: Any) -> int:
    """How deep lists and objects nest in `value` (iterative: no recursion on what a client sent)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def count_image_parts(messages: list) -> int:
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") in ("image_url", "image"))
    return count


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of message objects", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image_url"):
                    raise _bad(f"messages[{i}].content[{j}]: unsupported content part type {kind!r}; this model takes "
                               "'text' and 'image_url' parts", f"messages[{i}].content[{j}]")
    return messages


def _check_tools(body: dict) -> tuple[list[dict] | None, str | dict | None]:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array of tool objects", "tools")
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                           f"tools[{i}]")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise _bad(f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters")
        if not tools:
            tools = None
    choice = body.get("tool_choice")
    if choice is None:
        return tools, ("auto" if tools else None)
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad(f"'tool_choice' must be 'none', 'auto', 'required' or a function object, got {choice!r}",
                       "tool_choice")
        if choice == "required" and not tools:
            raise _bad("tool_choice 'required' needs 'tools'", "tool_choice")
        return tools, choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise _bad("'tool_choice' object must be {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if not tools or name not in {t["function"]["name"] for t in tools}:
        raise _bad(f"tool_choice names the function {name!r}, which is not in 'tools'", "tool_choice")
    return tools, choice


def _sampling_param_name(exc: SamplingParamsError) -> str | None:
    """The request field an error is about, in OpenAI's names (the error carries it: `SamplingParamsError.field`)."""
    if exc.field is None:
        return None
    name = exc.field.split(".")[0]
    return _OPENAI_PARAM_NAMES.get(name, name)


def parse_chat_request(body: dict, *, max_tokens_default: int | None = None, max_n: int | None = None,
                       max_tokens_ceiling: int | None = None) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raises `OpenAIError` (400) naming the field at fault. `max_n` and
    `max_tokens_ceiling` are the server's limits (a max_tokens up to the ceiling is clamped to the context later)."""
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise _bad(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")
    model = _expect(body, "model", (str,), "a string")
    if not model:
        raise _bad("'model' is required", "model")
    messages = _check_messages(body.get("messages"))
    stream = bool(_expect(body, "stream", (bool,), "a boolean"))
    stream_options = _expect(body, "stream_options", (dict,), "an object") or {}
    if stream_options and not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if body.get("logit_bias"):
        raise _bad("'logit_bias' is not supported by this server", "logit_bias")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _bad("only the 'text' output modality is supported", "modalities")
    logprobs = bool(_expect(body, "logprobs", (bool,), "a boolean"))
    top_logprobs = _expect(body, "top_logprobs", (int,), "an integer")
    if top_logprobs is not None:
        if not logprobs:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if not 0 <= top_logprobs <= MAX_LOGPROBS:
            raise _bad(f"'top_logprobs' must be between 0 and {MAX_LOGPROBS}, got {top_logprobs}", "top_logprobs")
    tools, tool_choice = _check_tools(body)
    render = {name: bool(_expect(body, name, (bool,), "a boolean")) for name in EXTRA_CHAT_FIELDS if name in body}
    add_generation_prompt = render.get("add_generation_prompt", True)
    continue_final_message = render.get("continue_final_message", False)
    if add_generation_prompt and continue_final_message:
        raise _bad("'continue_final_message' needs 'add_generation_prompt': false", "continue_final_message")
    parallel_tool_calls = _expect(body, "parallel_tool_calls", (bool,), "a boolean")
    raw_format = _expect(body, "response_format", (dict,), "an object")
    try:
        response_format = response_format_from_openai(raw_format)
    except PromptError as exc:
        param = "response_format.json_schema" if (raw_format or {}).get("type") == "json_schema" else "response_format.type"
        raise _bad(str(exc), param) from None

    options = {name: body[name] for name in (*OPENAI_SAMPLING_OPTIONS, *EXTRA_SAMPLING_FIELDS) if body.get(name) is not None}
    if options.get("max_tokens") is None and options.get("max_completion_tokens") is None:
        options["max_tokens"] = max_tokens_default
    max_param = "max_completion_tokens" if "max_completion_tokens" in options else "max_tokens"
    requested = options.get(max_param)
    if max_tokens_ceiling is not None and isinstance(requested, (int, float)) and not isinstance(requested, bool) \
            and requested > max_tokens_ceiling:
        raise _bad(f"'{max_param}' is {requested}; this server allows at most {max_tokens_ceiling} "
                   "(xgenmm serve --max-tokens-ceiling); up to that it is capped to what the context leaves",
                   max_param, "invalid_sampling_option")
    n = options.get("n")
    if max_n is not None and isinstance(n, int) and not isinstance(n, bool) and n > max_n:
        raise _bad(f"'n' is {n}; this server returns at most {max_n} choices (xgenmm serve --max-n)", "n",
                   "invalid_sampling_option")
    try:
        chat = build_chat_request(
            messages, sampling=options, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
            response_format=response_format,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
    except SamplingParamsError as exc:
        param = _sampling_param_name(exc)
        if param == "max_tokens":
            param = max_param
        raise OpenAIError(str(exc), 400, param=param, code="invalid_sampling_option") from None
    except PromptError as exc:
        raise OpenAIError(str(exc), 400, param="tools", code="invalid_tools") from None
    return ChatCompletionRequest(
        model=model, chat=chat, stream=stream, include_usage=bool(stream_options.get("include_usage")),
        logprobs=logprobs, top_logprobs=top_logprobs or 0, num_images=count_image_parts(messages),
        return_token_ids=render.get("return_token_ids", False),
    )
