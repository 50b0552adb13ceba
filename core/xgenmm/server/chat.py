"""`/v1/chat/completions`: a validated request -> the shared `AsyncLLM` -> an OpenAI response or an SSE stream.

Every request joins the engine's continuous batch. Errors that the request causes (a bad image, a prompt that does
not fit) surface before any byte of the response is sent, so they are proper 4xx error objects even for streams:
the stream is only returned once its first output exists. A client that goes away aborts its request (the engine
frees its KV blocks): streaming responses are cancelled by the ASGI server, non-streaming ones notice through
`request.is_disconnected()` polling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from .. import tools as tool_calls_lib
from ..async_llm import AsyncLLM
from ..engine.engine_loop import new_request_id
from ..errors import ImageError, PromptError, XGenMMError
from ..outputs import RequestOutput
from . import responses as R
from .config import ServerConfig
from .errors import OpenAIError, error_from_exception
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, parse_chat_request

logger = logging.getLogger("xgenmm.server")


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was ready."""


@dataclass
class _ChoiceState:
    """Per-choice streaming state (text deltas may go through a tool-call parser)."""

    index: int
    parser: tool_calls_lib.ToolCallStreamParser | None
    finished: bool = False
    num_tool_calls: int = 0
    completion_tokens: int = 0


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
        req = parse_chat_request(body, max_tokens_default=self.config.max_tokens_default)
        self._check_model(req)
        if req.num_images > self.config.max_images_per_request:
            limit = self.config.max_images_per_request
            raise OpenAIError(f"the request has {req.num_images} images; this server accepts at most {limit} per "
                              "request (xgenmm serve --max-images-per-request)", 400, param="messages",
                              code="too_many_images")
        sampling, tools = self._tool_sampling(req, body)
        request_id = new_request_id("chatcmpl")
        gen = self.llm.chat(req.messages, sampling, request_id=request_id, tools=tools, image_policy=self.image_policy,
                            add_generation_prompt=req.add_generation_prompt,
                            continue_final_message=req.continue_final_message)
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
        if not req.stream:
            return self._final_response(req, first, tools)
        return self._stream(req, gen, first, tools)

    # ---- validation ----------------------------------------------------------------------------------------------
    def _check_model(self, req: ChatCompletionRequest) -> None:
        if req.model not in self._accepted_models:
            raise OpenAIError(f"the model {req.model!r} does not exist on this server; it serves "
                              f"{self.config.model_name!r} (see /v1/models)", 400, param="model",
                              code="model_not_found")

    def _tool_sampling(self, req: ChatCompletionRequest, body: dict):
        """Tools for the prompt, and the grammar that keeps tool calls well-formed: a forced call ("required" or a
        named function) always gets it; with "auto" a response_format, if any, decides the output instead."""
        sampling = req.sampling
        if not req.tools:
            return sampling, None
        try:
            tools = tool_calls_lib.normalize_tools(req.tools)
            mode, _ = tool_calls_lib.resolve_tool_choice(req.tool_choice, tools)
            if mode == "none":
                return sampling, None
            if mode == "required" or sampling.structured_outputs is None:
                grammar = tool_calls_lib.tool_call_structured_outputs(
                    tools, req.tool_choice, parallel_tool_calls=bool(body.get("parallel_tool_calls", False)))
                if grammar is not None:
                    sampling = sampling.replace(structured_outputs=grammar)
        except PromptError as exc:
            raise OpenAIError(str(exc), 400, param="tools", code="invalid_tools") from None
        return sampling, tools

    def _request_error(self, exc: BaseException) -> OpenAIError:
        param = "messages" if isinstance(exc, (ImageError, PromptError)) else None
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
    def _final_response(self, req: ChatCompletionRequest, out: RequestOutput, tools) -> dict:
        choices = []
        completion_tokens = 0
        for o in out.outputs:
            completion_tokens += len(o.token_ids)
            content, calls, finish = o.text, None, o.finish_reason
            if tools:
                parsed = tool_calls_lib.parse_tool_calls(o.text, tools)
                if parsed.tool_calls:
                    calls = [c.to_openai() for c in parsed.tool_calls]
                    content = parsed.content or None
                    finish = "tool_calls"
            logprobs = None
            if req.logprobs:
                logprobs = {"content": R.logprobs_content(o.token_ids, o.logprobs, req.top_logprobs, self._pieces)}
            choice = {"index": o.index, "message": R.chat_message(content, calls), "logprobs": logprobs,
                      "finish_reason": finish}
            if req.return_token_ids:
                choice["token_ids"] = list(o.token_ids)
            choices.append(choice)
        prompt_tokens = out.metrics.num_prompt_tokens if out.metrics else len(out.prompt_token_ids)
        self.metrics.observe_finished(out.metrics, prompt_tokens, completion_tokens)
        response = R.completion_response(R.new_completion_id(), R.now(), req.model, choices,
                                         R.usage(prompt_tokens, completion_tokens, out.num_cached_tokens))
        if req.return_token_ids:
            response["prompt_token_ids"] = list(out.prompt_token_ids)
        return response

    # ---- streaming -----------------------------------------------------------------------------------------------
    async def _stream(self, req: ChatCompletionRequest, gen, first: RequestOutput, tools) -> AsyncIterator[str]:
        completion_id, created = R.new_completion_id(), R.now()
        n = req.sampling.n
        states = [_ChoiceState(i, tool_calls_lib.ToolCallStreamParser(tools) if tools else None) for i in range(n)]
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
                    for choice in self._delta_choices(req, states[o.index], o):
                        yield make_chunk([choice])
                if out.finished:
                    break
                # A client that goes away cancels this generator here (the ASGI server watches the connection).
                out = await gen.__anext__()
            completion_tokens = sum(s.completion_tokens for s in states)
            prompt_tokens = last.metrics.num_prompt_tokens if last.metrics else len(last.prompt_token_ids)
            if include_usage:
                yield R.sse(R.chunk(completion_id, created, req.model, [],
                                    R.usage(prompt_tokens, completion_tokens, last.num_cached_tokens), True))
            self.metrics.observe_finished(last.metrics, prompt_tokens, completion_tokens)
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

    def _delta_choices(self, req: ChatCompletionRequest, st: _ChoiceState, o) -> list[dict]:
        """Stream chunks for one choice's delta (text, tool calls, finish)."""
        if st.finished:
            return []
        st.completion_tokens += len(o.token_ids)
        choices = []
        logprobs = None
        if req.logprobs and o.token_ids:
            logprobs = R.logprobs_content(o.token_ids, o.logprobs, req.top_logprobs, self._pieces)
        if st.parser is None:
            if o.text or logprobs:
                choices.append(R.chunk_choice(st.index, {"content": o.text}, None, logprobs))
        else:
            events = st.parser.feed(o.text) if o.text else []
            if o.finish_reason is not None:
                events += st.parser.finish()
            choices += self._tool_event_choices(st, events)
            if logprobs and not choices:  # keep logprobs flowing while text is held back by the parser
                choices.append(R.chunk_choice(st.index, {}, None, logprobs))
            elif logprobs:
                choices[0]["logprobs"] = {"content": logprobs}
        if o.finish_reason is not None:
            st.finished = True
            finish = "tool_calls" if st.num_tool_calls else o.finish_reason
            choices.append(R.chunk_choice(st.index, {}, finish))
        if req.return_token_ids and o.token_ids:
            if not choices:
                choices.append(R.chunk_choice(st.index, {}))
            choices[0]["token_ids"] = list(o.token_ids)  # this delta's tokens, as vLLM streams them
        return choices

    @staticmethod
    def _tool_event_choices(st: _ChoiceState, events) -> list[dict]:
        choices = []
        for ev in events:
            if ev.text:
                choices.append(R.chunk_choice(st.index, {"content": ev.text}))
            elif ev.tool_call is not None:
                call = ev.tool_call.to_openai()
                call["index"] = st.num_tool_calls
                st.num_tool_calls += 1
                choices.append(R.chunk_choice(st.index, {"tool_calls": [call]}))
            elif ev.invalid is not None:  # not a usable call: hand its text back as content
                text = f"{tool_calls_lib.TOOL_CALL_OPEN}{ev.invalid.arguments}"
                choices.append(R.chunk_choice(st.index, {"content": text}))
        return choices
