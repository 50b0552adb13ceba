"""`/v1/chat/completions`: a validated request -> the shared `AsyncLLM` -> an OpenAI response or an SSE stream.

Every request joins the engine's continuous batch. Errors that the request causes (a bad image, a prompt that does
not fit) surface before any byte of the response is sent, so they are proper 4xx error objects even for streams:
the stream is only returned once its first output exists. A client that goes away aborts its request (the engine
frees its KV blocks): streaming responses are cancelled by the ASGI server, non-streaming ones notice through
`request.is_disconnected()` polling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..async_llm import AsyncLLM
from ..chat.reply import ChoiceStream, chat_choice, usage_of
from ..client.request_ids import new_request_id
from ..input_work import run_input_work
from ..errors import ImageError, PromptError, XGenMMError
from ..outputs import RequestOutput
from ..tool_calls import TOOL_CALL_OPEN
from . import responses as R
from .config import ServerConfig
from .errors import OpenAIError, error_from_exception
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, parse_chat_request

logger = logging.getLogger("xgenmm.server")


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was ready."""


class ChatCompletionService:
    def __init__(self, llm: AsyncLLM, config: ServerConfig, metrics: ServerMetrics):
        self.llm = llm
        self.config = config
        self.metrics = metrics
        self.image_policy = config.image_policy()
        self._accepted_models = {config.model_name, config.model}
        self._pieces = R.TokenPieces(llm.get_tokenizer())

    # ---- entry point ---------------------------------------------------------------------------------------------
    async def create(self, body: dict, is_disconnected: Callable[[], Awaitable[bool]]) -> dict | AsyncIterator[str]:
        req, gen, first = await self._admit(
            parse_chat_request, body, is_disconnected, images_param="messages", request_id_prefix="chatcmpl",
            max_tokens_default=self.config.max_tokens_default, max_n=self.config.max_n,
            max_tokens_ceiling=self.config.max_tokens_ceiling)
        if not req.stream:
            return self._final_response(req, first)
        return self._stream(req, gen, first)

    # ---- validation ----------------------------------------------------------------------------------------------
    async def _admit(self, parse: Callable[..., Any], body: dict, is_disconnected: Callable[[], Awaitable[bool]], *,
                     images_param: str, request_id_prefix: str, **limits: Any) -> tuple[Any, Any, RequestOutput]:
        """What every route does before it answers: validate the body off the event loop (`parse(body, **limits)`
        bounds schemas: CPU work, under the boundary rule), check the model and the image count, submit through
        `AsyncLLM.chat` and wait for the first output, so a request's own errors are still 4xx. Returns the parsed
        request, the output generator and its first output."""
        try:
            req = await run_input_work(parse, body, images=False, passthrough=(OpenAIError,), **limits)
        except XGenMMError as exc:
            raise self._request_error(exc) from None
        self._check_model(req)
        if req.num_images > self.config.max_images_per_request:
            limit = self.config.max_images_per_request
            raise OpenAIError(f"the request has {req.num_images} images; this server accepts at most {limit} per "
                              "request (xgenmm serve --max-images-per-request)", 400, param=images_param,
                              code="too_many_images")
        chat = dataclasses.replace(req.chat, image_policy=self.image_policy)
        gen = self.llm.chat(chat, request_id=new_request_id(request_id_prefix))
        try:
            first = await self._next_or_disconnect(gen, is_disconnected)
        except StopAsyncIteration:  # pragma: no cover - the engine always emits a final output
            raise OpenAIError("the engine returned no output", 500, "server_error")
        except ClientDisconnected:
            self.metrics.requests.labels("disconnected").inc()
            raise
        except Exception as exc:
            await gen.aclose()
            raise self._request_error(exc) from exc
        return req, gen, first

    def _check_model(self, req: ChatCompletionRequest) -> None:
        if req.model not in self._accepted_models:
            raise OpenAIError(f"the model {req.model!r} does not exist on this server; it serves "
                              f"{self.config.model_name!r} (see /v1/models)", 400, param="model",
                              code="model_not_found")

    def _request_error(self, exc: BaseException) -> OpenAIError:
        param = getattr(exc, "field", None) or ("messages" if isinstance(exc, (ImageError, PromptError)) else None)
        err = error_from_exception(exc, param)
        if err.status >= 500:
            logger.error("request failed: %r", exc, exc_info=not isinstance(exc, XGenMMError))
        return err

    async def _next_or_disconnect(self, gen, is_disconnected) -> RequestOutput:
        """The generator's next output, abandoning it (and aborting the request) if the client disconnects."""
        task = asyncio.ensure_future(gen.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.config.disconnect_poll_s)
                if done:
                    return task.result()
                if await is_disconnected():
                    raise ClientDisconnected()
        finally:
            if not task.done():
                task.cancel()  # raises CancelledError inside the generator: AsyncLLM aborts the request
                try:
                    await task
                except BaseException:
                    pass
                await gen.aclose()

    # ---- non-streaming -------------------------------------------------------------------------------------------
    def _final_response(self, req: ChatCompletionRequest, out: RequestOutput) -> dict:
        choices = []
        for o in out.outputs:
            reply = chat_choice(o, req.tools)
            calls = [c.to_openai() for c in reply.tool_calls] or None
            # OpenAI has no "invalid tool call": a reply whose calls are all unusable comes back as its text.
            content = reply.content if calls or not reply.invalid_tool_calls else o.text
            logprobs = None
            if req.logprobs:
                logprobs = {"content": R.logprobs_content(o.token_ids, o.logprobs, req.top_logprobs, self._pieces)}
            choice = {"index": o.index, "message": R.chat_message(content, calls), "logprobs": logprobs,
                      "finish_reason": reply.finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = list(o.token_ids)
            choices.append(choice)
        usage = usage_of(out)
        self.metrics.observe_finished(out.metrics, usage.prompt_tokens, usage.completion_tokens)
        response = R.completion_response(R.new_completion_id(), R.now(), req.model, choices, usage.to_openai())
        if req.return_token_ids:
            response["prompt_token_ids"] = list(out.prompt_token_ids)
        return response

    # ---- streaming -----------------------------------------------------------------------------------------------
    async def _stream(self, req: ChatCompletionRequest, gen, first: RequestOutput) -> AsyncIterator[str]:
        completion_id, created = R.new_completion_id(), R.now()
        n = req.sampling.n
        streams = [ChoiceStream(req.tools) for _ in range(n)]
        include_usage = req.include_usage

        def make_chunk(choices: list[dict], prompt_token_ids: list[int] | None = None) -> str:
            body = R.chunk(completion_id, created, req.model, choices, None, include_usage)
            if prompt_token_ids is not None:
                body["prompt_token_ids"] = prompt_token_ids
            return R.sse(body)

        last = first
        finished_ok = False
        try:
            for i in range(n):
                prompt_ids = list(first.prompt_token_ids) if req.return_token_ids and i == 0 else None
                yield make_chunk([R.chunk_choice(i, {"role": "assistant", "content": ""})], prompt_ids)
            out: RequestOutput | None = first
            while out is not None:
                last = out
                for o in out.outputs:
                    for choice in self._delta_choices(req, streams[o.index], o):
                        yield make_chunk([choice])
                if out.finished:
                    break
                # A client that goes away cancels this generator here (the ASGI server watches the connection).
                out = await gen.__anext__()
            usage = usage_of(last)
            if include_usage:
                yield R.sse(R.chunk(completion_id, created, req.model, [], usage.to_openai(), True))
            self.metrics.observe_finished(last.metrics, usage.prompt_tokens, usage.completion_tokens)
            finished_ok = True
            yield R.SSE_DONE
        except (asyncio.CancelledError, ClientDisconnected, GeneratorExit):
            self.metrics.requests.labels("disconnected").inc()
            raise
        except Exception as exc:  # after the headers went out: report in-band, as OpenAI does
            err = self._request_error(exc)
            self.metrics.count_error(err.status)
            yield R.sse(err.to_dict())
            yield R.SSE_DONE
        finally:
            if not finished_ok:
                await gen.aclose()  # aborts the request if it is still running

    def _delta_choices(self, req: ChatCompletionRequest, stream: ChoiceStream, o) -> list[dict]:
        """Stream chunks for one choice's delta: prose, tool calls, then the finish reason; logprobs and token ids
        ride on the first chunk of the delta."""
        choices = []
        finish = None
        for ev in stream.feed(o):
            if ev.text:
                choices.append(R.chunk_choice(o.index, {"content": ev.text}))
            elif ev.tool_call is not None:
                call = ev.tool_call.to_openai()
                call["index"] = ev.tool_call_index
                choices.append(R.chunk_choice(o.index, {"tool_calls": [call]}))
            elif ev.invalid_tool_call is not None:  # not a usable call: hand its text back as content
                choices.append(R.chunk_choice(o.index, {"content": f"{TOOL_CALL_OPEN}{ev.invalid_tool_call.arguments}"}))
            elif ev.finish_reason is not None:
                finish = ev.finish_reason
        extras: dict = {}
        if req.logprobs and o.token_ids:
            extras["logprobs"] = {"content": R.logprobs_content(o.token_ids, o.logprobs, req.top_logprobs, self._pieces)}
        if req.return_token_ids and o.token_ids:
            extras["token_ids"] = list(o.token_ids)  # this delta's tokens, as vLLM streams them
        if extras:
            if not choices:
                choices.append(R.chunk_choice(o.index, {}))
            choices[0].update(extras)
        if finish is not None:
            choices.append(R.chunk_choice(o.index, {}, finish))
        return choices
