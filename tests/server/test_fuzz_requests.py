"""Property-based fuzz of `/v1/chat/completions` on the real server (loopback): OpenAI chat requests with hostile
values in every field (huge numbers, NaN / Infinity, lone surrogates, NULs, strings nested thousands deep that are
parsed later, huge and recursive schemas, many tools, many stop strings). Never a 5xx, every refusal names its field
(`param`), and a normal request still answers.

`XGENMM_FUZZ_EXAMPLES` sets the number of cases (default 80, for CI; run it with thousands locally).
"""

from __future__ import annotations

import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.hostile_values import (
    dag_schema,
    deep_arguments,
    dumps_raw,
    huge_items_schema,
    many_stop_strings,
    recursive_schema,
    ref_chain_schema,
    small_png_url,
    tool,
)
from tests.server.support import MODEL_NAME, make_config
from xgenmm.server import BackgroundServer

EXAMPLES = int(os.environ.get("XGENMM_FUZZ_EXAMPLES", "80"))
URL = "/v1/chat/completions"
CASES = {"run": 0, "refused": 0, "answered": 0}

LONE = ["\ud800", "a\udfffb", "\udbff"]
RAW_NUMBERS = ["__HUGE_INT__", "__BIG_INT__", "__NEG_HUGE_INT__", "__NAN__", "__INF__", "__NEG_INF__", "__OVERFLOW__"]


@pytest.fixture(scope="module")
def fuzz_server(tiny_checkpoint, server_llm):
    config = make_config(tiny_checkpoint, max_tokens_ceiling=8, max_tokens_default=4)
    with BackgroundServer(config, llm=server_llm) as srv:
        with httpx.Client(base_url=srv.base_url, timeout=120) as http:
            yield http
    print(f"request fuzz: {CASES}")


def json_schema(schema: object) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


scalars = st.one_of(
    st.sampled_from(RAW_NUMBERS + LONE + ["a\x00b", "\x00", "", "x" * 20_000, deep_arguments(3000), True, False,
                                          None, [], {}, 0, -1, 1e308, -1e308, 2**63, 2**64, 5e-324]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec=None), max_size=20),  # any code point, surrogates included
)

# Hostile values that only make sense in one field.
FIELD_VALUES = {
    "stop": st.sampled_from([many_stop_strings(5000), many_stop_strings(65), ["\ud800"], [""], ["x" * 17_000],
                             [None], "stop", [deep_arguments(2000)]]),
    "response_format": st.sampled_from([json_schema(dag_schema(22)), json_schema(recursive_schema()),
                                        json_schema(ref_chain_schema(3000)), json_schema(huge_items_schema()),
                                        json_schema({"type": "array", "maxItems": "__INF__"}),
                                        json_schema(deep_arguments(2000)), json_schema({"\ud800": 1}),
                                        {"type": "json_object"}, {"type": "\ud800"}, {"type": "json_schema"}]),
    "tools": st.sampled_from([[tool(f"t{i}") for i in range(300)], [tool("dag", dag_schema(22))],
                              [tool("rec", recursive_schema())], [tool("chain", ref_chain_schema(3000))],
                              [tool("items", huge_items_schema())], [tool("\ud800")], [tool("a\x00b")],
                              [tool("x", {"type": "object", "properties": {"\ud800": {"type": "string"}}})]]),
    "tool_choice": st.sampled_from(["required", "none", "\ud800", {"type": "function", "function": {"name": "\ud800"}},
                                    {"type": "function", "function": {"name": "__HUGE_INT__"}}]),
}
# Ordinary values, mixed in so that hostile values also meet requests that get as far as generating.
VALID_VALUES = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 3, "max_completion_tokens": 2, "n": 2, "seed": 7,
                "stop": ["\n", "zz"], "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": True,
                "stream": True, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 1,
                "stop_token_ids": [2], "ignore_eos": True, "return_token_ids": True, "parallel_tool_calls": False,
                "response_format": {"type": "json_object"}, "tools": [tool("lookup")], "tool_choice": "auto",
                "model": MODEL_NAME}
TOP_FIELDS = ["model", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "seed", "stop",
              "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "stream", "stream_options",
              "response_format", "tools", "tool_choice", "parallel_tool_calls", "top_k", "min_p",
              "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "return_token_ids"]
MESSAGE_FIELDS = ["content", "role", "name", "tool_calls", "tool_call_id", "image_url", "text_part"]


def message_mutation(field: str, value: object) -> dict:
    base = {"role": "user", "content": "Say hello."}
    if field == "tool_calls":
        args = value if isinstance(value, str) else deep_arguments(20_000)
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]}
    if field == "image_url":
        return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": value}},
                                            {"type": "text", "text": "What is it?"}]}
    if field == "text_part":
        return {"role": "user", "content": [{"type": "text", "text": value}]}
    return {**base, field: value}


@st.composite
def hostile_requests(draw) -> tuple[dict, list[str]]:
    body: dict = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["top", "top", "message", "unknown_key"]))
        if kind == "top":
            name = draw(st.sampled_from(TOP_FIELDS))
            strategy = FIELD_VALUES.get(name)
            value = draw(strategy | scalars if strategy is not None else scalars)
            if name in VALID_VALUES and draw(st.booleans()):
                value = VALID_VALUES[name]
            body[name] = value
        elif kind == "message":
            name = draw(st.sampled_from(MESSAGE_FIELDS))
            value = draw(scalars if name != "image_url" else scalars | st.just(small_png_url()))
            body["messages"] = [message_mutation(name, value), {"role": "user", "content": "and now?"}]
        else:
            name = draw(st.sampled_from(LONE + ["\x00", "x" * 300, "a\x00b"]))
            body[name] = draw(scalars)
        touched.append(name)
    return body, touched


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(case=hostile_requests())
def test_hostile_requests_are_4xx_naming_their_field(fuzz_server, case):
    body, touched = case
    CASES["run"] += 1
    reply = fuzz_server.post(URL, content=dumps_raw(body), headers={"Content-Type": "application/json"})
    assert reply.status_code < 500, (touched, reply.text[:500])
    if reply.status_code >= 400:
        CASES["refused"] += 1
        error = reply.json()["error"]
        assert error["param"], (touched, error)
        assert error["message"] and error["type"] == "invalid_request_error", error
    else:
        CASES["answered"] += 1
        assert reply.status_code == 200
        assert "server_error" not in reply.text, (touched, reply.text[:500])


def test_a_normal_request_still_answers(fuzz_server):
    reply = fuzz_server.post(URL, json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hello."}],
                                        "max_tokens": 3, "temperature": 0})
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert reply.json()["usage"]["completion_tokens"] >= 1
