"""The same request through every front end gives the same engine request: identical prompt token ids, identical
`SamplingParams` and identical greedy tokens, whether it came through the HTTP server, `ChatXGenMM` (LangChain) or
`XGenMM` (LlamaIndex). (The vLLM backend runs the same cases in tests/vllm_backend/test_vllm_conformance.py.)

Every front end here shares one engine (the process-wide one for the tiny checkpoint); a spy on its handle records
what each call submitted and the final output the engine produced for it.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.chat.conformance_cases import CASES, MAX_TOKENS, Case
from xgenmm import AsyncLLM
from xgenmm.client import open_engine
from xgenmm.outputs import RequestOutput
from xgenmm.sampling_params import RequestOutputKind
from xgenmm.server import BackgroundServer, ServerConfig

class _Spy:
    """Records (prompt ids, params, final output) of every request the shared engine's handle submits to its core."""

    def __init__(self, handle):
        self.handle = handle
        self.records: list[dict] = []
        self._submit = handle.submit

    def submit(self, prepared, sink):
        record = {"id": prepared.request_id, "ids": list(prepared.prompt_token_ids), "params": prepared.params,
                  "output": None}
        self.records.append(record)

        def spy_sink(out):
            if isinstance(out, RequestOutput):
                record["output"] = out if record["output"] is None or out.finished else record["output"]
            return sink(out)

        return self._submit(prepared, spy_sink)

    def last(self) -> dict:
        return self.records[-1]


@pytest.fixture(scope="module")
def spy(tiny_checkpoint):
    handle = open_engine("native", str(tiny_checkpoint), "cpu", "float32")
    recorder = _Spy(handle)
    handle.submit = recorder.submit
    yield recorder
    del handle.submit  # back to the class method


@pytest.fixture(scope="module")
def server(tiny_checkpoint, spy):
    config = ServerConfig(model=str(tiny_checkpoint), served_model_name="tiny", device="cpu", dtype="float32",
                          port=0, api_key="")
    with BackgroundServer(config, llm=AsyncLLM(str(tiny_checkpoint), device="cpu", dtype="float32")) as srv:
        yield srv


def _via_server(server, case: Case) -> dict:
    body = {"model": "tiny", "messages": case.messages, "temperature": 0, "max_tokens": MAX_TOKENS, "seed": 1,
            "n": case.n}
    for key in ("tools", "tool_choice", "response_format", "stop"):
        if getattr(case, key) is not None:
            body[key] = getattr(case, key)
    if case.top_logprobs is not None:
        body.update(logprobs=True, top_logprobs=case.top_logprobs)
    reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _via_langchain(tiny_checkpoint, case: Case, max_tokens: int = MAX_TOKENS):
    from langchain_core.messages import convert_to_messages

    from langchain_xgenmm import ChatXGenMM

    llm = ChatXGenMM(model=str(tiny_checkpoint), device="cpu", dtype="float32", temperature=0.0,
                     max_tokens=max_tokens, seed=1, n=case.n, logprobs=case.top_logprobs is not None or None,
                     top_logprobs=case.top_logprobs)
    messages = convert_to_messages(case.messages)
    runnable = llm
    if case.tools is not None:
        choice = case.tool_choice
        if isinstance(choice, dict):
            choice = choice["function"]["name"]
        runnable = llm.bind_tools(case.tools, tool_choice=choice)
    if case.response_format is not None:
        fmt = case.response_format
        if fmt["type"] == "json_schema":
            runnable = llm.with_structured_output(fmt["json_schema"]["schema"], method="json_schema", include_raw=True)
        else:
            runnable = llm.with_structured_output(None, method="json_mode", include_raw=True)
    if case.n > 1:
        return llm.generate([messages], stop=case.stop)
    result = runnable.invoke(messages, stop=case.stop)
    return result["raw"] if isinstance(result, dict) else result


def _via_llamaindex(tiny_checkpoint, case: Case):
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.xgenmm import XGenMM

    llm = XGenMM(model=str(tiny_checkpoint), device="cpu", dtype="float32", temperature=0.0, max_tokens=MAX_TOKENS,
                 seed=1)
    messages = []
    for m in case.messages:
        content = m["content"]
        if isinstance(content, str):
            messages.append(ChatMessage(role=m["role"], content=content))
        else:
            blocks = [ImageBlock(url=p["image_url"]["url"]) if p["type"] == "image_url" else TextBlock(text=p["text"])
                      for p in content]
            messages.append(ChatMessage(role=m["role"], blocks=blocks))
    kwargs: dict[str, Any] = {"n": case.n}
    for key in ("tools", "tool_choice", "response_format", "stop"):
        if getattr(case, key) is not None:
            kwargs[key] = getattr(case, key)
    if case.top_logprobs is not None:
        kwargs["logprobs"] = case.top_logprobs  # SamplingParams' name: how many alternatives per position
    return llm.chat(messages, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_front_end_sends_the_same_request(case, spy, server, tiny_checkpoint):
    server_reply = _via_server(server, case)
    from_server = spy.last()
    lc_reply = _via_langchain(tiny_checkpoint, case)
    from_langchain = spy.last()
    li_reply = _via_llamaindex(tiny_checkpoint, case)
    from_llamaindex = spy.last()
    records = {"server": from_server, "langchain": from_langchain, "llamaindex": from_llamaindex}
    assert len({r["id"] for r in records.values()}) == 3  # three distinct engine requests

    for name, record in records.items():
        assert record["ids"] == from_server["ids"], f"{name}: prompt ids differ from the server's"
        params = record["params"].replace(output_kind=RequestOutputKind.FINAL_ONLY)
        assert params == from_server["params"].replace(output_kind=RequestOutputKind.FINAL_ONLY), name
        tokens = [o.token_ids for o in record["output"].outputs]
        assert tokens == [o.token_ids for o in from_server["output"].outputs], f"{name}: greedy tokens differ"

    params = from_server["params"]
    assert params.n == case.n and params.max_tokens == MAX_TOKENS and params.temperature == 0.0
    # What each front end reports agrees too: finish reasons (OpenAI's, "tool_calls" for calls) and tool calls.
    server_choice = server_reply["choices"][0]
    lc_message = lc_reply.generations[0][0].message if case.n > 1 else lc_reply
    assert lc_message.response_metadata["finish_reason"] == server_choice["finish_reason"]
    assert li_reply.raw["finish_reason"] == server_choice["finish_reason"]
    server_calls = [c["function"]["name"] for c in server_choice["message"].get("tool_calls") or []]
    assert [c["name"] for c in lc_message.tool_calls] == server_calls
    assert [c["function"]["name"] for c in li_reply.message.additional_kwargs["tool_calls"]] == server_calls
    assert lc_message.usage_metadata["input_tokens"] == server_reply["usage"]["prompt_tokens"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):  # cached tokens differ: later calls hit the cache
        assert li_reply.raw["usage"][key] == server_reply["usage"][key]
    if case.n > 1:
        assert len(server_reply["choices"]) == len(lc_reply.generations[0]) == len(li_reply.raw["choices"]) == case.n
    if case.top_logprobs is not None:
        assert lc_message.response_metadata["logprobs"] == server_choice["logprobs"]
        assert len(li_reply.logprobs) == len(server_choice["logprobs"]["content"])


def test_the_rules_where_front_ends_used_to_differ(spy, server, tiny_checkpoint):
    """Each of these differed between front ends before the shared request builder."""
    required = next(c for c in CASES if c.name == "tools_required")
    _via_server(server, required)
    params = spy.last()["params"]
    # forced calls: no stop strings (they would cut the call's JSON) and a grammar bounded to max_tokens
    assert params.stop in (None, []) and params.structured_outputs is not None
    assert "maxLength" in params.structured_outputs.grammar
    none = next(c for c in CASES if c.name == "tools_none")
    _via_llamaindex(tiny_checkpoint, none)
    text = spy.handle.tokenizer.decode(spy.last()["ids"])
    assert "get_weather" not in text and "<tools>" not in text  # tool_choice="none" shows no tools
    schema_case = next(c for c in CASES if c.name == "json_schema")
    _via_server(server, schema_case)
    schema = spy.last()["params"].structured_outputs.json
    assert schema["properties"]["city"].get("maxLength") is not None  # the server bounds schemas to max_tokens
    named = next(c for c in CASES if c.name == "tools_named")
    reply = _via_langchain(tiny_checkpoint, named, max_tokens=96)  # room for the call's skeleton in this vocabulary
    assert reply.response_metadata["finish_reason"] == "tool_calls" and reply.tool_calls  # as OpenAI / ChatOpenAI
