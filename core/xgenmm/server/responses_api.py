"""`POST /v1/responses`: OpenAI's Responses API on the same engine, request builder and reply parser as
`/v1/chat/completions`.

A Responses body (`input` as a string or a list of items, `instructions`, `tools` in the flat Responses shape,
`tool_choice`, `text.format`, `max_output_tokens`) is translated into chat messages and options and built by the
core's `build_chat_request`, so the same conversation gives the same prompt and tokens through either route. The
reply is read by the core (`chat_choice` / `ChoiceStream`) into output items: a `message` with `output_text`, and one
`function_call` item per tool call. Streaming sends the SDK's typed events (`response.created`,
`response.output_item.added`, `response.output_text.delta`, `response.function_call_arguments.done`,
`response.completed` ...), each with its `sequence_number`. Nothing is stored: `previous_response_id`, `conversation`
and `background` are refused (send the whole conversation in `input`, as with chat completions).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..chat.reply import ChoiceStream, chat_choice, usage_of
from ..chat.request import ChatRequest, build_chat_request, response_format_from_openai
from ..errors import PromptError, SamplingParamsError
from ..outputs import RequestOutput
from ..sampling_params import RequestOutputKind
from ..tool_calls import TOOL_CALL_OPEN
from .chat import ChatCompletionService, ClientDisconnected
from .errors import OpenAIError

__all__ = ["ResponsesRequest", "parse_responses_request", "ResponsesService"]

# Bookkeeping fields a client may send that change nothing here.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
                            "include", "truncation", "reasoning", "stream_options", "max_tool_calls"})
REFUSED_FIELDS = {
    "previous_response_id": "this server stores no responses: send the whole conversation in 'input'",
    "conversation": "this server stores no conversations: send the whole conversation in 'input'",
    "background": "background responses are not supported",
    "prompt": "stored prompts are not supported: send 'instructions' and 'input'",
}
KNOWN_FIELDS = frozenset({"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
                          "max_output_tokens", "temperature", "top_p", "stream", "seed"}) | IGNORED_FIELDS \
    | frozenset(REFUSED_FIELDS)
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")


def _bad(message: str, param: str | None, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, 400, param=param, code=code)


@dataclass
class ResponsesRequest:
    model: str
    chat: ChatRequest
    stream: bool
    num_images: int
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the response object repeats


# ---- request translation -------------------------------------------------------------------------------------------
def _content_parts(content: Any, where: str) -> tuple[Any, int]:
    """Responses content (a string or input_text / input_image parts) -> chat content, and its image count."""
    if isinstance(content, str):
        return content, 0
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or an array of content parts", f"{where}.content")
    parts, images = [], 0
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        at = f"{where}.content[{j}]"
        if kind in _TEXT_PARTS:
            if not isinstance(part.get("text"), str):
                raise _bad(f"{at}.text must be a string", f"{at}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise _bad(f"{at}: send the image as 'image_url' (a data: URL; file_id is not supported)",
                           f"{at}.image_url")
            parts.append({"type": "image_url", "image_url": {"url": url}})
            images += 1
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal", ""))})
        else:
            raise _bad(f"{at}: unsupported content part type {kind!r}; this model takes 'input_text' and "
                       "'input_image' parts", at)
    return parts, images


def _messages(body: dict) -> tuple[list[dict], int]:
    raw = body.get("input")
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    if isinstance(raw, str):
        return messages + [{"role": "user", "content": raw}], 0
    if not isinstance(raw, list) or not raw:
        raise _bad("'input' must be a string or a non-empty array of input items", "input")
    images = 0
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = _ROLES.get(item["role"]) if isinstance(item.get("role"), str) else None
            if role is None:
                raise _bad(f"{where}.role must be 'user', 'assistant', 'system' or 'developer'", f"{where}.role")
            content, count = _content_parts(item.get("content"), where)
            images += count
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            name, arguments, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(arguments, str) or not isinstance(call_id, str):
                raise _bad(f"{where}: a function_call needs string 'call_id', 'name' and 'arguments'", where)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls of one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _bad(f"{where}.call_id must be a string", f"{where}.call_id")
            content, count = _content_parts(output if output is not None else "", where)
            images += count
            messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
        elif kind == "reasoning":
            continue  # this model writes no reasoning items; a client may echo another model's
        else:
            raise _bad(f"{where}: unsupported input item type {kind!r}; this server takes 'message', 'function_call' "
                       "and 'function_call_output' items", f"{where}.type")
    if not any(m["role"] != "system" for m in messages):
        raise _bad("'input' has no message, function call or function call output for the model to answer", "input")
    return messages, images


def _tools(body: dict) -> tuple[list[dict] | None, Any]:
    tools = body.get("tools")
    chat_tools = None
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array of tool objects", "tools")
        chat_tools = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str) \
                    or not tool["name"]:
                raise _bad(f"tools[{i}] must be {{'type': 'function', 'name': ..., 'parameters': ...}}; this server "
                           "runs function tools only", f"tools[{i}]")
            params = tool.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise _bad(f"tools[{i}].parameters must be a JSON schema object", f"tools[{i}].parameters")
            fn = {"name": tool["name"], "parameters": params or {"type": "object", "properties": {}}}
            if tool.get("description"):
                fn["description"] = str(tool["description"])
            chat_tools.append({"type": "function", "function": fn})
        chat_tools = chat_tools or None
    choice = body.get("tool_choice")
    names = {t["function"]["name"] for t in chat_tools or ()}
    if choice is None:
        return chat_tools, ("auto" if chat_tools else None)
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _bad(f"'tool_choice' must be 'none', 'auto', 'required' or a function object, got {choice!r}",
                       "tool_choice")
        if choice == "required" and not chat_tools:
            raise _bad("tool_choice 'required' needs 'tools'", "tool_choice")
        return chat_tools, choice
    name = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise _bad("'tool_choice' object must be {'type': 'function', 'name': ...}", "tool_choice")
    if name not in names:
        raise _bad(f"tool_choice names the function {name!r}, which is not in 'tools'", "tool_choice")
    return chat_tools, {"type": "function", "function": {"name": name}}


def _response_format(body: dict) -> Any:
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad("'text' must be an object", "text")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if not isinstance(fmt, dict):
        raise _bad("'text.format' must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        raw = {"type": "json_schema", "json_schema": spec}
    else:
        raw = {"type": fmt.get("type")}
    try:
        return response_format_from_openai(raw)
    except PromptError as exc:
        raise _bad(str(exc), "text.format") from None


def _number(body: dict, name: str) -> Any:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise _bad(f"'{name}' must be a number", name)
    return value


def parse_responses_request(body: dict, *, max_tokens_default: int | None = None,
                            max_tokens_ceiling: int | None = None) -> ResponsesRequest:
    """Validate a Responses body and build the core request; raises `OpenAIError` (400) naming the field."""
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise _bad(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")
    for name, why in REFUSED_FIELDS.items():
        if body.get(name):
            raise _bad(f"'{name}': {why}", name, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required (a string)", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    messages, images = _messages(body)
    tools, tool_choice = _tools(body)
    response_format = _response_format(body)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    max_tokens = body.get("max_output_tokens")
    if max_tokens is None:
        max_tokens = max_tokens_default
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad("'max_output_tokens' must be a positive integer", "max_output_tokens")
    elif max_tokens_ceiling is not None and max_tokens > max_tokens_ceiling:
        raise _bad(f"'max_output_tokens' is {max_tokens}; this server allows at most {max_tokens_ceiling} "
                   "(xgenmm serve --max-tokens-ceiling)", "max_output_tokens", "invalid_sampling_option")
    sampling = {"max_tokens": max_tokens}
    for name in ("temperature", "top_p", "seed"):
        if _number(body, name) is not None:
            sampling[name] = body[name]
    try:
        chat = build_chat_request(
            messages, sampling=sampling, tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel,
            response_format=response_format,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
    except SamplingParamsError as exc:
        param = getattr(exc, "field", None)
        param = {"max_tokens": "max_output_tokens", "structured_outputs": "text.format"}.get(param, param)
        raise OpenAIError(str(exc), 400, param=param, code="invalid_sampling_option") from None
    except PromptError as exc:
        raise OpenAIError(str(exc), 400, param="tools" if tools else "input", code="invalid_request") from None
    echo = {
        "instructions": body.get("instructions"),
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": bool(parallel) if parallel is not None else False,
        "temperature": chat.params.temperature,
        "top_p": chat.params.top_p,
        "max_output_tokens": body.get("max_output_tokens"),
        "text": body.get("text") or {"format": {"type": "text"}},
        "metadata": body.get("metadata") or {},
    }
    return ResponsesRequest(model=model, chat=chat, stream=stream, num_images=images, echo=echo)


# ---- response objects -----------------------------------------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(out: RequestOutput) -> dict[str, Any]:
    usage = usage_of(out)
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if status != "in_progress" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if status == "completed" else "", "status": status}


@dataclass
class _Envelope:
    """The response object's fields around its output."""

    response_id: str
    created_at: int
    model: str
    echo: dict[str, Any]

    def build(self, status: str, output: list[dict], usage: dict | None, incomplete: str | None = None) -> dict:
        return {"id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
                "error": None, "incomplete_details": {"reason": incomplete} if incomplete else None,
                "model": self.model, "output": output, "usage": usage, **self.echo}


def _status(finish_reason: str | None) -> tuple[str, str | None]:
    return ("incomplete", "max_output_tokens") if finish_reason == "length" else ("completed", None)


class ResponsesService(ChatCompletionService):
    """`/v1/responses` on the shared `AsyncLLM` (validation, disconnect handling and errors as for chat)."""

    async def create_response(self, body: dict,
                              is_disconnected: Callable[[], Awaitable[bool]]) -> dict | AsyncIterator[str]:
        req, gen, first = await self._admit(
            parse_responses_request, body, is_disconnected, images_param="input", request_id_prefix="resp",
            max_tokens_default=self.config.max_tokens_default, max_tokens_ceiling=self.config.max_tokens_ceiling)
        envelope = _Envelope(_id("resp"), int(time.time()), req.model, req.echo)
        if not req.stream:
            return self._final(req, envelope, first)
        return self._events(req, envelope, gen, first)

    def _final(self, req: ResponsesRequest, envelope: _Envelope, out: RequestOutput) -> dict:
        completion = out.outputs[0]
        reply = chat_choice(completion, req.chat.tools)
        calls = [c.to_openai() for c in reply.tool_calls]
        text = reply.content if calls or not reply.invalid_tool_calls else completion.text
        output = []
        if text or not calls:
            output.append(_message_item(_id("msg"), text or "", "completed"))
        output.extend(_call_item(_id("fc"), call, "completed") for call in calls)
        usage = _usage(out)
        self.metrics.observe_finished(out.metrics, usage["input_tokens"], usage["output_tokens"])
        status, incomplete = _status(reply.finish_reason)
        return envelope.build(status, output, usage, incomplete)

    async def _events(self, req: ResponsesRequest, envelope: _Envelope, gen,
                      first: RequestOutput) -> AsyncIterator[str]:
        seq = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            payload = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

        output: list[dict] = []
        message: dict[str, Any] | None = None  # the open message item: id, index, text

        def open_message() -> list[str]:
            nonlocal message
            message = {"id": _id("msg"), "index": len(output), "text": ""}
            output.append(_message_item(message["id"], "", "in_progress"))
            where = {"item_id": message["id"], "output_index": message["index"], "content_index": 0}
            return [event("response.output_item.added", output_index=message["index"], item=output[-1]),
                    event("response.content_part.added", **where, part=_text_part(""))]

        def close_message() -> list[str]:
            nonlocal message
            if message is None:
                return []
            done = _message_item(message["id"], message["text"], "completed")
            output[message["index"]] = done
            where = {"item_id": message["id"], "output_index": message["index"], "content_index": 0}
            events = [event("response.output_text.done", **where, text=message["text"], logprobs=[]),
                      event("response.content_part.done", **where, part=_text_part(message["text"])),
                      event("response.output_item.done", output_index=message["index"], item=done)]
            message = None
            return events

        def text_events(text: str) -> list[str]:
            events = open_message() if message is None else []
            message["text"] += text
            events.append(event("response.output_text.delta", item_id=message["id"], output_index=message["index"],
                                content_index=0, delta=text, logprobs=[]))
            return events

        def call_events(call: dict[str, Any]) -> list[str]:
            events = close_message()
            item_id, index = _id("fc"), len(output)
            output.append(_call_item(item_id, call, "in_progress"))
            events.append(event("response.output_item.added", output_index=index, item=output[-1]))
            arguments = call["function"]["arguments"]
            events.append(event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                                delta=arguments))
            events.append(event("response.function_call_arguments.done", item_id=item_id, output_index=index,
                                name=call["function"]["name"], arguments=arguments))
            output[index] = _call_item(item_id, call, "completed")
            events.append(event("response.output_item.done", output_index=index, item=output[index]))
            return events

        stream = ChoiceStream(req.chat.tools)
        finish = None
        finished_ok = False
        try:
            yield event("response.created", response=envelope.build("in_progress", [], None))
            yield event("response.in_progress", response=envelope.build("in_progress", [], None))
            out: RequestOutput | None = first
            last = first
            while out is not None:
                last = out
                for ev in stream.feed(out.outputs[0]):
                    if ev.text:
                        for line in text_events(ev.text):
                            yield line
                    elif ev.tool_call is not None:
                        for line in call_events(ev.tool_call.to_openai()):
                            yield line
                    elif ev.invalid_tool_call is not None:  # not a usable call: its text goes back as text
                        for line in text_events(f"{TOOL_CALL_OPEN}{ev.invalid_tool_call.arguments}"):
                            yield line
                    elif ev.finish_reason is not None:
                        finish = ev.finish_reason
                if out.finished:
                    break
                out = await gen.__anext__()
            if not output:
                for line in open_message():
                    yield line
            for line in close_message():
                yield line
            usage = _usage(last)
            self.metrics.observe_finished(last.metrics, usage["input_tokens"], usage["output_tokens"])
            status, incomplete = _status(finish)
            kind = "response.completed" if status == "completed" else "response.incomplete"
            finished_ok = True
            yield event(kind, response=envelope.build(status, output, usage, incomplete))
        except (asyncio.CancelledError, ClientDisconnected, GeneratorExit):
            self.metrics.requests.labels("disconnected").inc()
            raise
        except Exception as exc:  # after the headers went out: report in-band, as OpenAI does
            err = self._request_error(exc)
            self.metrics.count_error(err.status)
            body = err.to_dict()["error"]
            yield event("error", code=body.get("code"), message=body.get("message"), param=body.get("param"))
        finally:
            if not finished_ok:
                await gen.aclose()
