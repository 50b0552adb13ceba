"""`build_chat_request`: the rules every front end now shares (OpenAI's where front ends used to differ), and the
adapter options that used to be spelled or supported differently."""

from __future__ import annotations

import json

import pytest

from xgenmm.chat import ChoiceStream, ResponseFormat, build_chat_request, chat_choice, usage_of
from xgenmm.errors import ConfigError, PromptError, SamplingParamsError
from xgenmm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from xgenmm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}


def test_tool_choice_none_shows_no_tools():
    req = build_chat_request(USER, tools=[TOOL], tool_choice="none", sampling={"stop": ["x"]})
    assert req.tools is None and req.tool_choice == "none"
    assert req.params.structured_outputs is None and req.params.stop == ["x"]


def test_forced_call_is_bounded_and_has_no_stop_strings():
    req = build_chat_request(USER, tools=[TOOL], tool_choice="required", sampling={"max_tokens": 40, "stop": ["}"]})
    assert req.tool_choice == "required" and req.tools[0]["function"]["name"] == "lookup"
    assert not req.params.stop
    grammar = req.params.structured_outputs.grammar
    assert "maxLength" in grammar and "start: calls" in grammar
    named = build_chat_request(USER, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "lookup"}})
    assert named.tool_choice == "required"


def test_auto_keeps_stop_strings_and_constrains_started_calls():
    req = build_chat_request(USER, tools=[TOOL], sampling={"stop": ["END"], "max_tokens": 30})
    assert req.tool_choice == "auto" and req.params.stop == ["END"]
    assert "TEXT" in req.params.structured_outputs.grammar  # prose, or a well-formed call
    free = build_chat_request(USER, tools=[TOOL], constrain_auto_tool_calls=False)
    assert free.params.structured_outputs is None and free.tools


def test_response_format_is_bounded_shown_and_drops_stops():
    req = build_chat_request(USER, sampling={"max_tokens": 50, "stop": ["\n"]},
                             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    schema = req.params.structured_outputs.json
    assert schema["properties"]["name"]["maxLength"] > 0 and schema["properties"]["tags"]["maxItems"] > 0
    assert not req.params.stop and req.params.structured_outputs.whitespace_flexible is False
    system = [m["content"] for m in req.messages if m["role"] == "system"]
    assert json.dumps(SCHEMA) in system[-1] and len(system) == 2  # default system prompt + the instruction
    obj = build_chat_request(USER, response_format=ResponseFormat("json_object"))
    assert obj.params.structured_outputs.json_object and "JSON object only" in obj.messages[-1]["content"]
    assert build_chat_request(USER, response_format={"type": "text"}).params.structured_outputs is None


def test_with_auto_tools_a_response_format_decides_the_output():
    req = build_chat_request(USER, tools=[TOOL], response_format=ResponseFormat("json_schema", SCHEMA))
    assert req.tools is not None and req.params.structured_outputs.json is not None
    forced = build_chat_request(USER, tools=[TOOL], tool_choice="required", response_format=ResponseFormat("json_object"))
    assert forced.params.structured_outputs.grammar  # a forced call wins


def test_raw_structured_outputs_apply_when_nothing_else_decides():
    raw = StructuredOutputsParams(regex="[ab]+")
    assert build_chat_request(USER, structured_outputs=raw).params.structured_outputs == raw
    assert build_chat_request(USER, tools=[TOOL], tool_choice="required",
                              structured_outputs=raw).params.structured_outputs.grammar
    with pytest.raises(SamplingParamsError, match="cannot be combined"):
        build_chat_request(USER, sampling=SamplingParams(structured_outputs=raw), tools=[TOOL], tool_choice="required")


def test_openai_sampling_names():
    req = build_chat_request(USER, sampling={"max_completion_tokens": 7, "max_tokens": 3, "logprobs": True,
                                             "top_logprobs": 2, "top_k": 5, "n": 2},
                             output_kind=RequestOutputKind.DELTA)
    p = req.params
    assert (p.max_tokens, p.logprobs, p.top_k, p.n, p.output_kind) == (7, 2, 5, 2, RequestOutputKind.DELTA)
    assert build_chat_request(USER, sampling={}).params.max_tokens is None  # OpenAI: no limit but the context
    with pytest.raises(SamplingParamsError, match="bogus"):
        build_chat_request(USER, sampling={"bogus": 1})
    with pytest.raises(SamplingParamsError, match="top_logprobs"):
        build_chat_request(USER, sampling={"top_logprobs": 2})
    with pytest.raises(PromptError, match="yaml"):
        build_chat_request(USER, response_format={"type": "yaml"})


def _output(text: str, finish="stop") -> RequestOutput:
    return RequestOutput("r", None, [1, 2], [CompletionOutput(0, text, [7, 8, 9], finish_reason=finish)], True,
                         RequestMetrics(0.0, num_prompt_tokens=2, num_generated_tokens=3, num_cached_tokens=1))


def test_replies_report_openai_finish_reasons_and_usage():
    call = '<tool_call>\n{"name": "lookup", "arguments": {"query": "cats"}}\n</tool_call>'
    choice = chat_choice(_output(call).outputs[0], [TOOL])
    assert choice.finish_reason == "tool_calls" and choice.tool_calls[0].arguments == {"query": "cats"}
    assert choice.content is None
    assert chat_choice(_output("plain", "length").outputs[0], [TOOL]).finish_reason == "length"
    usage = usage_of(_output("x"))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.total_tokens) == (2, 3, 1, 5)
    stream = ChoiceStream([TOOL])
    events = stream.feed(CompletionOutput(0, call[:20], [1]))
    events += stream.feed(CompletionOutput(0, call[20:], [2], finish_reason="stop"))
    assert [e.tool_call.name for e in events if e.tool_call] == ["lookup"]
    assert events[-1].finish_reason == "tool_calls"


def test_adapters_share_one_image_policy_and_engine_resolution(tmp_path):
    from llama_index.llms.xgenmm import XGenMM

    from langchain_xgenmm import ChatXGenMM

    options = dict(allow_remote_images=True, max_image_pixels=1234, fetch_timeout_s=3.5, local_file_roots=[str(tmp_path)])
    lc, li = ChatXGenMM(**options), XGenMM(**options)
    assert lc._image_policy() == li.image_policy
    assert li.image_policy.max_image_pixels == 1234 and li.image_policy.fetch_timeout_s == 3.5
    with pytest.warns(DeprecationWarning, match="fetch_timeout_s"):
        assert XGenMM(image_fetch_timeout=2.0).image_policy.fetch_timeout_s == 2.0
    # tensor_parallel_size reaches the engine resolver from both adapters (and needs the vLLM backend)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        XGenMM(model=str(tmp_path), tensor_parallel_size=2).engine_clients
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        ChatXGenMM(model=str(tmp_path), tensor_parallel_size=2)._engine_clients()
