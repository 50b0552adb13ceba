"""Request validation and response pieces without a server: OpenAI fields -> SamplingParams, 400s naming the field,
error mapping, token pieces for logprobs."""

from __future__ import annotations

import pytest

from xgenmm.errors import (
    EngineDeadError,
    ImageSourceNotAllowedError,
    PromptTooLongError,
    SamplingParamsError,
)
from xgenmm.sampling_params import RequestOutputKind
from xgenmm.server.errors import OpenAIError, error_from_exception
from xgenmm.server.protocol import parse_chat_request
from xgenmm.server.responses import TokenPieces

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def parse(**body):
    return parse_chat_request({"model": "m", "messages": USER, **body})


def rejected(**body) -> OpenAIError:
    with pytest.raises(OpenAIError) as exc:
        parse(**body)
    assert exc.value.status == 400
    return exc.value


def test_openai_fields_map_to_sampling_params():
    req = parse(max_tokens=5, max_completion_tokens=7, temperature=0.2, top_p=0.5, n=3, seed=9, stop="END",
                logprobs=True, top_logprobs=4, presence_penalty=0.5, top_k=20, stream=True,
                stream_options={"include_usage": True})
    sp = req.sampling
    assert sp.max_tokens == 7  # max_completion_tokens wins over the deprecated max_tokens
    assert (sp.temperature, sp.top_p, sp.n, sp.seed, sp.stop, sp.logprobs) == (0.2, 0.5, 3, 9, ["END"], 4)
    assert sp.presence_penalty == 0.5 and sp.top_k == 20
    assert sp.output_kind is RequestOutputKind.DELTA and req.include_usage
    plain = parse()
    assert plain.sampling.max_tokens is None and plain.sampling.temperature == 1.0  # OpenAI defaults
    assert plain.sampling.output_kind is RequestOutputKind.FINAL_ONLY and plain.sampling.logprobs is None
    assert parse(logprobs=True).sampling.logprobs == 0


def test_response_format_becomes_compact_constrained_json():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    so = parse(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}).sampling
    assert so.structured_outputs.json == schema and not so.structured_outputs.whitespace_flexible
    assert parse(response_format={"type": "json_object"}).sampling.structured_outputs.json_object
    assert parse(response_format={"type": "text"}).sampling.structured_outputs is None
    assert rejected(response_format={"type": "json_schema"}).param == "response_format.json_schema"
    assert rejected(response_format={"type": "yaml"}).param == "response_format.type"


def test_invalid_fields_are_named():
    assert rejected(temperature=-0.1).param == "temperature"
    assert rejected(top_p=0).param == "top_p"
    assert rejected(max_tokens=0).param == "max_tokens"
    assert rejected(max_completion_tokens=0).param == "max_completion_tokens"
    assert rejected(n=0).param == "n"
    assert rejected(top_logprobs=2).param == "top_logprobs"  # needs logprobs: true
    assert rejected(logprobs=True, top_logprobs=21).param == "top_logprobs"
    assert rejected(stream_options={"include_usage": True}).param == "stream_options"
    assert rejected(logit_bias={"1": 5}).param == "logit_bias"
    assert rejected(stream="yes").param == "stream"
    assert rejected(tool_choice="required").param == "tool_choice"  # no tools
    assert rejected(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}).param == "tool_choice"
    assert rejected(tools=[{"type": "function"}]).param == "tools[0]"
    assert rejected(bogus=1).code == "unknown_parameter"
    assert rejected(model=None).param == "model"
    err = rejected(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    assert err.param == "messages[0].content[0]"
    assert rejected(messages=[]).param == "messages"
    assert parse(user="someone", parallel_tool_calls=False, metadata={}).model == "m"  # harmless fields pass


def test_tools_and_image_count():
    req = parse(tools=[TOOL], messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "compare"}]}])
    assert req.tool_choice == "auto" and req.wants_tool_calls and req.num_images == 2
    assert not parse(tools=[TOOL], tool_choice="none").wants_tool_calls


def test_error_mapping_never_blames_the_server_for_user_errors():
    assert error_from_exception(ImageSourceNotAllowedError("x"), "messages").status == 400
    too_long = error_from_exception(PromptTooLongError("x"))
    assert (too_long.status, too_long.code) == (400, "context_length_exceeded")
    assert error_from_exception(SamplingParamsError("x")).status == 400
    assert error_from_exception(EngineDeadError("x")).status == 503
    internal = error_from_exception(RuntimeError("secret detail"))
    assert internal.status == 500 and "secret detail" not in internal.message


class _FakeTokenizer:
    pieces = {1: "\u2581the", 2: "<0xE2>", 3: "<|end|>"}

    def convert_ids_to_tokens(self, token_id):
        return self.pieces[token_id]


def test_token_pieces_show_spaces_and_bytes():
    pieces = TokenPieces(_FakeTokenizer())
    assert pieces(1) == (" the", list(b" the"))
    assert pieces(2) == ("bytes:\\xe2", [0xE2])
    assert pieces(3) == ("<|end|>", list(b"<|end|>"))
