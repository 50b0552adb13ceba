"""ChatXGenMM on a tiny random checkpoint: image forms and policy, streaming, usage, structured output, tools,
cancellation and concurrency. A random model writes gibberish; these tests check the mechanics around it."""

from __future__ import annotations

import asyncio
import base64
import threading
import time

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, Field
from typing_extensions import Annotated, TypedDict
from tests.langchain.helpers import LoopbackImageServer, model_params, png_bytes

from langchain_xgenmm import ChatXGenMM
from langchain_xgenmm.messages import to_core_messages
from xgenmm.errors import ImageError, ImageSourceNotAllowedError, PromptError

PNG = png_bytes()
B64 = base64.b64encode(PNG).decode()
DATA_URL = f"data:image/png;base64,{B64}"


@pytest.fixture(scope="module")
def llm() -> ChatXGenMM:
    return ChatXGenMM(**model_params(max_tokens=8))


@pytest.fixture(scope="module")
def text_only_tokens(llm) -> int:
    return llm.invoke([HumanMessage(content=[{"type": "text", "text": "Describe."}])]).usage_metadata["input_tokens"]


@pytest.fixture(scope="module")
def server():
    srv = LoopbackImageServer(PNG)
    yield srv
    srv.close()


def wait_for_idle(llm: ChatXGenMM, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = llm._engine_stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0:
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


# ---- image forms ----------------------------------------------------------------------------------------------------

IMAGE_BLOCKS = {
    "openai data url": {"type": "image_url", "image_url": {"url": DATA_URL}},
    "openai bare string": {"type": "image_url", "image_url": DATA_URL},
    "v1 base64": {"type": "image", "base64": B64, "mime_type": "image/png"},
    "v1 url (data)": {"type": "image", "url": DATA_URL},
    "v0 base64": {"type": "image", "source_type": "base64", "data": B64, "mime_type": "image/png"},
    "anthropic base64": {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}},
}


@pytest.mark.parametrize("form", list(IMAGE_BLOCKS))
def test_every_image_form_reaches_the_model(llm, text_only_tokens, form):
    message = HumanMessage(content=[IMAGE_BLOCKS[form], {"type": "text", "text": "Describe."}])
    reply = llm.invoke([message])
    # the image's vision tokens (128 per tile, at least base + one tile) are part of the prompt
    assert reply.usage_metadata["input_tokens"] >= text_only_tokens + 2 * 128


def test_image_forms_all_convert_to_one_part_each():
    blocks = [*IMAGE_BLOCKS.values(), {"type": "text", "text": "q"}]
    core = to_core_messages([HumanMessage(content=blocks)])
    parts = core[0]["content"]
    assert len(parts) == len(blocks)
    assert all(p == {"type": "image_url", "image_url": {"url": DATA_URL}} for p in parts[:-1])
    assert parts[-1] == {"type": "text", "text": "q"}


@pytest.mark.parametrize("block", [
    {"type": "image_url", "image_url": {"url": "URL"}},
    {"type": "image", "url": "URL"},
    {"type": "image", "source_type": "url", "url": "URL"},
    {"type": "image", "source": {"type": "url", "url": "URL"}},
])
def test_http_image_forms_with_remote_allowed(llm, text_only_tokens, server, block):
    import json

    block = json.loads(json.dumps(block).replace("URL", server.url))
    remote = llm.model_copy(update={"allow_remote_images": True, "allow_private_addresses": True})
    reply = remote.invoke([HumanMessage(content=[block, {"type": "text", "text": "Describe."}])])
    assert reply.usage_metadata["input_tokens"] >= text_only_tokens + 2 * 128


def test_several_images_across_turns_and_in_a_tool_message(llm, text_only_tokens):
    one = llm.invoke([HumanMessage(content=[IMAGE_BLOCKS["v1 base64"], {"type": "text", "text": "Describe."}])])
    per_image = one.usage_metadata["input_tokens"] - text_only_tokens
    messages = [
        HumanMessage(content=[IMAGE_BLOCKS["v1 base64"], IMAGE_BLOCKS["openai data url"], {"type": "text", "text": "a"}]),
        AIMessage("", tool_calls=[{"name": "camera", "args": {}, "id": "c1"}]),
        ToolMessage(content=[{"type": "text", "text": "shot"}, IMAGE_BLOCKS["anthropic base64"]], tool_call_id="c1"),
    ]
    reply = llm.invoke(messages)
    assert reply.usage_metadata["input_tokens"] >= text_only_tokens + 3 * per_image - 64


def test_url_refused_by_default_and_private_address_refused(llm, server):
    message = HumanMessage(content=[{"type": "image", "url": server.url}, {"type": "text", "text": "x"}])
    with pytest.raises(ImageSourceNotAllowedError, match="remote image URLs are not allowed"):
        llm.invoke([message])
    remote = llm.model_copy(update={"allow_remote_images": True})
    with pytest.raises(ImageSourceNotAllowedError, match="non-public address 127.0.0.1"):
        remote.invoke([message])


def test_local_files_need_permission(llm, tmp_path, text_only_tokens):
    path = tmp_path / "pic.png"
    path.write_bytes(PNG)
    message = HumanMessage(content=[{"type": "image_url", "image_url": {"url": str(path)}}, {"type": "text", "text": "Describe."}])
    with pytest.raises(ImageSourceNotAllowedError, match="local image files are not allowed"):
        llm.invoke([message])
    local = llm.model_copy(update={"allow_local_files": True, "local_file_roots": [str(tmp_path)]})
    assert local.invoke([message]).usage_metadata["input_tokens"] >= text_only_tokens + 2 * 128
    outside = llm.model_copy(update={"allow_local_files": True, "local_file_roots": [str(tmp_path / "sub")]})
    with pytest.raises(ImageSourceNotAllowedError, match="outside the allowed local_file_roots"):
        outside.invoke([message])


def test_bad_images_name_message_and_block(llm):
    history = [SystemMessage("be brief"), HumanMessage("hi"), AIMessage("hello")]
    with pytest.raises(ImageError, match=r"message 3, block 1: file_id image references"):
        llm.invoke(history + [HumanMessage(content=[{"type": "text", "text": "x"}, {"type": "image", "file_id": "file-1"}])])
    with pytest.raises(ImageError, match=r"message 3, part 0: .*not a supported image"):
        bad = base64.b64encode(b"definitely not an image" * 10).decode()
        llm.invoke(history + [HumanMessage(content=[{"type": "image", "base64": bad, "mime_type": "image/png"}])])
    with pytest.raises(PromptError, match=r"message 0, block 0: xGen-MM takes text and images only, got a 'audio' block"):
        llm.invoke([HumanMessage(content=[{"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}])])
    too_small = llm.model_copy(update={"max_image_bytes": 50})
    with pytest.raises(ImageError, match=r"message 0, part 0: .*over the limit of 50 bytes"):
        too_small.invoke([HumanMessage(content=[IMAGE_BLOCKS["v1 base64"]])])


# ---- streaming, usage, stop -----------------------------------------------------------------------------------------


def test_stream_matches_invoke_and_ends_with_usage(llm):
    prompt = [HumanMessage(content=[IMAGE_BLOCKS["v1 base64"], {"type": "text", "text": "Stream please."}])]
    greedy = llm.model_copy(update={"max_tokens": 12})
    whole = greedy.invoke(prompt)
    chunks = list(greedy.stream(prompt))
    assert len(chunks) >= 3  # tokens arrive as they are produced
    assert "".join(c.text for c in chunks) == whole.text
    last = chunks[-1]
    assert last.chunk_position == "last" and last.text == ""
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert last.usage_metadata[key] == whole.usage_metadata[key]
    assert last.usage_metadata["output_tokens"] == 12
    assert last.usage_metadata["input_token_details"]["cache_read"] > 0  # the prompt was just computed by invoke
    assert last.response_metadata["model_name"] == llm.model
    assert last.response_metadata["model_provider"] == "xgenmm"
    assert last.response_metadata["finish_reason"] == "length"


async def test_astream_matches_ainvoke(llm):
    whole = await llm.ainvoke("Async hello")
    chunks = [c async for c in llm.astream("Async hello")]
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] == 8


def test_stop_sequence_cuts_the_reply(llm):
    text = llm.model_copy(update={"max_tokens": 16}).invoke("Say something").text
    words = text.split()
    assert len(words) >= 3
    reply = llm.model_copy(update={"max_tokens": 16}).invoke("Say something", stop=[words[2]])
    assert words[2] not in reply.text and reply.response_metadata["finish_reason"] == "stop"


def test_callbacks_see_every_token_once(llm):
    from langchain_core.callbacks import BaseCallbackHandler

    class Counter(BaseCallbackHandler):
        def __init__(self):
            self.tokens = []

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

    counter = Counter()
    streaming = llm.model_copy(update={"streaming": True})
    reply = streaming.invoke("count", config={"callbacks": [counter]})
    assert "".join(counter.tokens) == reply.text and len(counter.tokens) >= 2


# ---- structured output ----------------------------------------------------------------------------------------------


class Person(BaseModel):
    """A person."""

    name: str = Field(description="the name")
    age: int
    height_m: float
    tags: list[str]
    nickname: str | None = None


class PersonDict(TypedDict):
    """A person."""

    name: Annotated[str, ..., "the name"]
    age: int
    height_m: float
    tags: list[str]


PERSON_SCHEMA = {"title": "Person", "description": "A person.", "type": "object",
                 "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "height_m": {"type": "number"},
                                "tags": {"type": "array", "items": {"type": "string"}}},
                 "required": ["name", "age", "height_m", "tags"]}


def _check_person(value, schema):
    if schema is Person:
        assert isinstance(value, Person)
        return
    assert isinstance(value, dict)
    assert set(value) >= {"name", "age", "height_m", "tags"} and set(value) <= {"name", "age", "height_m", "tags", "nickname"}
    assert isinstance(value["name"], str) and isinstance(value["age"], int) and isinstance(value["height_m"], (int, float))
    assert isinstance(value["tags"], list) and all(isinstance(t, str) for t in value["tags"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
@pytest.mark.parametrize("schema", [Person, PersonDict, PERSON_SCHEMA], ids=["pydantic", "typeddict", "json_schema"])
def test_structured_output_is_always_schema_valid(llm, schema, method):
    model = llm.model_copy(update={"max_tokens": 120, "temperature": 1.0, "seed": 7})
    structured = model.with_structured_output(schema, method=method)
    _check_person(structured.invoke("Describe a person as JSON."), schema)
    raw = model.with_structured_output(schema, method=method, include_raw=True).invoke("Another person, as JSON.")
    assert raw["parsing_error"] is None and isinstance(raw["raw"], AIMessage)
    _check_person(raw["parsed"], schema)


async def test_structured_output_async_and_streamed(llm):
    model = llm.model_copy(update={"max_tokens": 120})
    structured = model.with_structured_output(Person)
    assert isinstance(await structured.ainvoke("A person."), Person)
    chunks = list(structured.stream("A person."))
    assert chunks and isinstance(chunks[-1], Person)


def test_structured_output_include_raw_reports_parsing_error(llm):
    # A budget too small for the schema's skeleton: the JSON is cut, and include_raw reports it instead of raising.
    tiny = llm.model_copy(update={"max_tokens": 6})
    out = tiny.with_structured_output(Person, include_raw=True).invoke("A person.")
    assert out["parsed"] is None and out["parsing_error"] is not None
    assert out["raw"].response_metadata["finish_reason"] == "length"


def test_json_mode_without_schema_gives_a_json_object(llm):
    model = llm.model_copy(update={"max_tokens": 200, "temperature": 1.0, "seed": 3})
    raw = model.with_structured_output(None, method="json_mode", include_raw=True).invoke("Any JSON object.")
    assert raw["raw"].text.lstrip().startswith("{")


# ---- tools ----------------------------------------------------------------------------------------------------------


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def describe_colour(colour: str, shade: str) -> str:
    """Describe a colour."""
    return colour


@pytest.mark.parametrize("choice", ["any", "required", "add", True, {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_call_is_valid(llm, choice):
    model = llm.model_copy(update={"max_tokens": 60})
    reply = model.bind_tools([add, describe_colour], tool_choice=choice).invoke("What is 2 + 3?")
    assert len(reply.tool_calls) == 1 and reply.invalid_tool_calls == []
    call = reply.tool_calls[0]
    assert call["id"].startswith("call_") and call["type"] == "tool_call"
    if choice not in ("any", "required", True):
        assert call["name"] == "add"
    expected = {"a": int, "b": int} if call["name"] == "add" else {"colour": str, "shade": str}
    assert set(call["args"]) == set(expected) and all(isinstance(call["args"][k], t) for k, t in expected.items())
    assert reply.content == ""


def test_forced_tool_call_streams_as_one_tool_call_chunk(llm):
    model = llm.model_copy(update={"max_tokens": 60}).bind_tools([add], tool_choice="add")
    chunks = list(model.stream("2 + 3?"))
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert [tc["name"] for tc in full.tool_calls] == ["add"] and full.chunk_position == "last"
    assert sum(1 for c in chunks if c.tool_call_chunks) == 1 and full.usage_metadata["output_tokens"] > 0


def test_bind_tools_rejects_unknown_forced_name(llm):
    with pytest.raises(PromptError, match="not among the tools"):
        llm.bind_tools([add], tool_choice="multiply")


def test_tool_choice_none_renders_no_tools(llm):
    reply = llm.bind_tools([add], tool_choice="none").invoke("hi")
    assert reply.tool_calls == []
    assert reply.usage_metadata["input_tokens"] < llm.bind_tools([add]).invoke("hi").usage_metadata["input_tokens"]


class _StubEngine:
    """Stands in for the engine to replay a fixed reply through ChatXGenMM's parsing (tool-call edge cases)."""

    def __init__(self, text: str, pieces: int = 7):
        self.text = text
        self.pieces = pieces

    def _out(self, text, finished):
        from xgenmm.outputs import CompletionOutput, RequestMetrics, RequestOutput

        return RequestOutput("stub", None, [1, 2, 3], [CompletionOutput(0, text, [5] * max(1, len(text) // 4),
                                                                         finish_reason="stop" if finished else None)],
                             finished, RequestMetrics(0.0, num_prompt_tokens=3, num_generated_tokens=4))

    def chat(self, request):  # one ChatRequest, as ChatXGenMM sends it
        return [self._out(self.text, True)]

    def chat_stream(self, request):
        n = max(1, len(self.text) // self.pieces)
        deltas = [self.text[i:i + n] for i in range(0, len(self.text), n)] or [""]
        for i, d in enumerate(deltas):
            yield self._out(d, i == len(deltas) - 1)


def _stubbed(text: str) -> ChatXGenMM:
    from xgenmm.lazy_engine import EngineClients

    model = ChatXGenMM(model="stub")
    stub = _StubEngine(text)
    model._lazy_engine.set(EngineClients(None, stub, None))
    return model.bind_tools([add])


def test_malformed_and_unknown_calls_become_invalid_tool_calls():
    text = ('Let me see. <tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>'
            '<tool_call>{"name": "mul", "arguments": {"a": 1}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": "4", "b": 5}}</tool_call>')
    reply = _stubbed(text).invoke("x")
    assert reply.content == "Let me see."
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("add", {"a": 4, "b": 5})]
    assert [(c["name"], c["error"].split(":")[0]) for c in reply.invalid_tool_calls] == [
        ("add", "invalid JSON"), ("mul", "unknown tool 'mul'; known tools")]


def test_streamed_text_then_tool_call_order():
    text = 'Thinking about it. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    chunks = list(_stubbed(text).stream("x"))
    kinds = ["call" if c.tool_call_chunks else ("last" if c.chunk_position == "last" else "text") for c in chunks]
    assert kinds[-1] == "last" and kinds[-2] == "call" and set(kinds[:-2]) == {"text"}
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.text == "Thinking about it. " and full.tool_calls[0]["args"] == {"a": 1, "b": 2}
    garbage = list(_stubbed("<tool_call>this is not json</tool_call>").stream("x"))
    merged = garbage[0]
    for c in garbage[1:]:
        merged = merged + c
    assert merged.tool_calls == [] and merged.invalid_tool_calls[0]["args"] == "this is not json"


def test_tool_history_is_rendered(llm):
    messages = [
        HumanMessage("What is 1 + 2"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "abc"}]),
        ToolMessage("3", tool_call_id="abc"),
    ]
    core = to_core_messages(messages)
    assert core[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert core[2] == {"role": "tool", "tool_call_id": "abc", "name": "add", "content": "3"}
    text = llm._engine_clients().handle.chat_renderer.render_text(core, tools=[])[0]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in text
    assert '<tool_response name="add">\n3\n</tool_response>' in text


# ---- cancellation and concurrency -----------------------------------------------------------------------------------


async def test_cancelling_astream_frees_engine_resources(llm):
    long = llm.model_copy(update={"max_tokens": 3000, "temperature": 1.0})
    before = wait_for_idle(llm)
    first = asyncio.Event()
    busy = {}

    async def consume():
        async for _ in long.astream([HumanMessage(content=[IMAGE_BLOCKS["v1 base64"], {"type": "text", "text": "go"}])]):
            if not first.is_set():
                busy["stats"] = llm._engine_stats()
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 60)
    assert busy["stats"].num_running == 1 and busy["stats"].kv_cache_usage > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await asyncio.to_thread(wait_for_idle, llm)
    assert (after.num_running, after.num_waiting, after.kv_cache_usage) == (0, 0, 0.0)
    assert after.num_generated_tokens - before.num_generated_tokens < 3000


def test_closing_a_sync_stream_early_aborts(llm):
    long = llm.model_copy(update={"max_tokens": 3000, "temperature": 1.0})
    stream = long.stream("go on forever")
    next(stream)
    assert llm._engine_stats().num_running == 1
    stream.close()
    after = wait_for_idle(llm)
    assert (after.num_running, after.kv_cache_usage) == (0, 0.0)


def _max_running_during(llm, work) -> int:
    seen = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            seen[0] = max(seen[0], llm._engine_stats().num_running)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return seen[0], result


def test_batch_reaches_the_engine_together(llm):
    model = llm.model_copy(update={"max_tokens": 48, "temperature": 1.0})
    inputs = [f"Question {i}" for i in range(16)]
    peak, replies = _max_running_during(llm, lambda: model.batch(inputs))
    assert len(replies) == 16 and all(isinstance(r, AIMessage) for r in replies)
    # more than the default thread pool's 6 workers on 2 cores: batch() lets all 16 in
    assert peak >= 8


def test_abatch_reaches_the_engine_together(llm):
    model = llm.model_copy(update={"max_tokens": 48, "temperature": 1.0})
    inputs = [f"Question {i}" for i in range(16)]
    peak, replies = _max_running_during(llm, lambda: asyncio.run(model.abatch(inputs)))
    assert len(replies) == 16
    assert peak >= 8


def test_no_weights_load_in_init():
    model = ChatXGenMM(model="/nonexistent/checkpoint")
    assert not model._lazy_engine.is_open
    assert model._identifying_params["model"] == "/nonexistent/checkpoint"
    params = model._get_ls_params(stop=["x"])
    assert params["ls_provider"] == "xgenmm" and params["ls_model_name"] == "/nonexistent/checkpoint"
    assert params["ls_stop"] == ["x"] and model._llm_type == "xgenmm-chat"
