"""The server driven by the official `openai` client (and raw httpx for what the client hides): streaming image
questions, usage with cached tokens, n / seed / logprobs, tool calls, json_schema, errors as OpenAI error objects,
API keys, limits, metrics."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from xgenmm.server import BackgroundServer

from tests.server.support import MAX_IMAGES, MODEL_NAME, make_config

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
        },
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                               "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def image_question(url: str, text: str = "What is in this image?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    health = httpx.get(server.base_url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME


def test_streamed_image_question_matches_non_streamed_and_reports_usage(client, image_data_url):
    messages = image_question(image_data_url)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert usage.completion_tokens == 6
    assert usage.prompt_tokens > 128  # the image's vision tokens count as prompt tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    full = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0)
    assert full.choices[0].message.content == text
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == usage.prompt_tokens
    # the same prompt again: its full blocks come from the prefix cache
    assert full.usage.prompt_tokens_details.cached_tokens >= 16


def test_n_seed_stop_and_logprobs(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    kwargs = dict(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=1.0, seed=1234, n=2,
                  logprobs=True, top_logprobs=3)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)
    for choice in a.choices:
        content = choice.logprobs.content
        assert 1 <= len(content) <= 5
        for entry in content:
            assert entry.logprob <= 0.0
            assert len(entry.top_logprobs) == 3
            tops = [t.logprob for t in entry.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            assert entry.logprob <= tops[0] + 1e-5
            if not entry.token.startswith("bytes:"):  # byte-fallback pieces are shown as bytes:\xNN
                assert bytes(entry.bytes).decode("utf-8") == entry.token
        plain = all(not e.token.startswith("bytes:") for e in content)
        if choice.finish_reason == "length" and plain:  # the token pieces spell the text
            assert "".join(e.token for e in content).strip() == choice.message.content.strip()

    first_word = a.choices[0].message.content.split()[0]
    stopped = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=1.0,
                                             seed=1234, stop=[first_word])
    assert first_word not in stopped.choices[0].message.content
    assert stopped.choices[0].finish_reason == "stop"


def _check_weather_args(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"}
    assert args["city"] in ("Paris", "Rome", "Oslo")
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 7


def test_tool_calls_forced_by_name_and_required(client):
    messages = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
    named = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, tools=[WEATHER_TOOL, CLOCK_TOOL], max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _check_weather_args(call.function.arguments)

    required = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[WEATHER_TOOL, CLOCK_TOOL],
                                              tool_choice="required", max_tokens=60)
    [call] = required.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        _check_weather_args(call.function.arguments)
    else:
        assert json.loads(call.function.arguments) == {}

    # the call goes back into the history with its result, and the conversation continues
    follow = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=4, tools=[WEATHER_TOOL], tool_choice="none",
        messages=messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                             {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}])
    assert follow.choices[0].message.tool_calls is None
    assert follow.choices[0].message.content


def test_streamed_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER_TOOL],
        tool_choice="required", max_tokens=60, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    _check_weather_args(calls[0]["arguments"])


def test_json_schema_response_validates(client):
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                       "count": {"type": "integer", "minimum": 0, "maximum": 99},
                       "ok": {"type": "boolean"}},
        "required": ["colour", "count", "ok"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Describe the colour as JSON."}], max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "colour", "schema": schema, "strict": True}})
    data = json.loads(response.choices[0].message.content)
    assert set(data) == {"colour", "count", "ok"}
    assert data["colour"] in ("red", "green", "blue")
    assert isinstance(data["count"], int) and 0 <= data["count"] <= 99
    assert isinstance(data["ok"], bool)
    assert response.choices[0].finish_reason == "stop"

    obj = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "JSON please"}],
                                         max_tokens=30, response_format={"type": "json_object"})
    text = obj.choices[0].message.content
    assert text.startswith("{")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_malformed_requests_are_openai_errors_and_the_server_keeps_serving(client, server, image_data_url):
    with pytest.raises(openai.BadRequestError) as bad_b64:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=2,
                                       messages=image_question("data:image/png;base64,@@not-base64@@"))
    err = error_of(bad_b64.value)
    assert err["type"] == "invalid_request_error" and err["param"] == "messages" and err["code"] == "invalid_image"

    with pytest.raises(openai.BadRequestError) as unknown_model:
        client.chat.completions.create(model="gpt-4o", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    err = error_of(unknown_model.value)
    assert err["param"] == "model" and err["code"] == "model_not_found" and "gpt-4o" in err["message"]

    image_part = {"type": "image_url", "image_url": {"url": image_data_url}}
    too_many = [{"role": "user", "content": [image_part] * (MAX_IMAGES + 1) + [{"type": "text", "text": "compare"}]}]
    with pytest.raises(openai.BadRequestError) as many:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=too_many)
    err = error_of(many.value)
    assert err["code"] == "too_many_images" and str(MAX_IMAGES) in err["message"]

    with pytest.raises(openai.BadRequestError) as bad_temp:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=2, temperature=-1,
                                       messages=[{"role": "user", "content": "hi"}])
    assert error_of(bad_temp.value)["param"] == "temperature"

    with pytest.raises(openai.BadRequestError) as remote:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=2,
                                       messages=image_question("http://127.0.0.1:9/cat.png"))
    assert error_of(remote.value)["code"] == "image_source_not_allowed"

    with pytest.raises(openai.BadRequestError) as local:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=image_question("/etc/hostname"))
    assert error_of(local.value)["code"] == "image_source_not_allowed"

    base = server.base_url
    raw = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    typo = httpx.post(base + "/v1/chat/completions",
                      json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_token": 3})
    assert typo.status_code == 400 and typo.json()["error"]["param"] == "max_token"
    no_messages = httpx.post(base + "/v1/chat/completions", json={"model": MODEL_NAME})
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    bad_role = httpx.post(base + "/v1/chat/completions",
                          json={"model": MODEL_NAME, "messages": [{"role": "robot", "content": "x"}]})
    assert bad_role.status_code == 400 and bad_role.json()["error"]["type"] == "invalid_request_error"
    huge = httpx.post(base + "/v1/chat/completions", content=b"x" * (3 * 1024**2),
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    route = httpx.get(base + "/v1/nothing-here")
    assert route.status_code == 404 and route.json()["error"]["type"] == "not_found_error"
    method = httpx.get(base + "/v1/chat/completions")
    assert method.status_code == 405 and "error" in method.json()

    ok = client.chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content
    metrics = httpx.get(base + "/metrics").text
    assert 'xgenmm_http_requests_total{outcome="server_error"}' not in metrics
    assert 'xgenmm_http_requests_total{outcome="client_error"}' in metrics


def test_metrics_expose_engine_state_and_latency(client, server):
    client.chat.completions.create(model=MODEL_NAME, max_tokens=3, messages=[{"role": "user", "content": "hello"}])
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("xgenmm_num_requests_waiting", "xgenmm_num_requests_running", "xgenmm_kv_cache_usage_ratio",
                 "xgenmm_prefix_cache_hit_rate", "xgenmm_generation_tokens_total", "xgenmm_prompt_tokens_total",
                 "xgenmm_request_latency_seconds_bucket", "xgenmm_time_to_first_token_seconds_count",
                 "process_resident_memory_bytes"):
        assert name in text, name
    count = [line for line in text.splitlines() if line.startswith("xgenmm_request_latency_seconds_count")]
    assert float(count[0].split()[-1]) >= 1


def test_api_key_is_enforced(tiny_checkpoint, server_llm, monkeypatch):
    monkeypatch.setenv("XGENMM_API_KEY", "s3cret")
    with BackgroundServer(make_config(tiny_checkpoint, api_key=None), llm=server_llm) as srv:
        url = srv.base_url + "/v1"
        messages = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.AuthenticationError) as denied:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=2)
        assert error_of(denied.value)["code"] == "invalid_api_key"
        assert httpx.get(url + "/models").status_code == 401
        ok = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=2)
        assert ok.choices[0].message.content
        assert httpx.get(srv.base_url + "/health").status_code == 200  # probes need no key
