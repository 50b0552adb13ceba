"""`POST /v1/responses` driven by the official `openai` client (`client.responses.create`, streaming too) and by
`ChatOpenAI(use_responses_api=True)`: text and image input, function tools and their round trip, structured output
through `text.format`, typed stream events, usage, and 4xx errors naming the field."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.server.support import MODEL_NAME

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"]}}
VERDICT = {"type": "object", "properties": {"label": {"type": "string", "enum": ["cat", "dog"]},
                                            "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
           "required": ["label", "confidence"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def image_input(url: str, text: str = "What colour is the square?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_image", "image_url": url},
                                         {"type": "input_text", "text": text}]}]


def test_text_and_image_input_with_usage_and_the_same_tokens_as_chat(client, image_data_url):
    response = client.responses.create(model=MODEL_NAME, input=image_input(image_data_url), max_output_tokens=6,
                                       temperature=0)
    assert response.object == "response" and response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    [item] = response.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert response.output_text == item.content[0].text and response.output_text
    assert response.usage.output_tokens == 6 and response.usage.input_tokens > 128
    assert response.usage.total_tokens == response.usage.input_tokens + 6
    # The same conversation through /v1/chat/completions: one request builder, so the same prompt and tokens.
    chat = client.chat.completions.create(model=MODEL_NAME, max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url}},
                                     {"type": "text", "text": "What colour is the square?"}]}])
    assert chat.choices[0].message.content == response.output_text
    assert chat.usage.prompt_tokens == response.usage.input_tokens
    text_only = client.responses.create(model=MODEL_NAME, input="Hello", instructions="Be brief.",
                                        max_output_tokens=3)
    assert text_only.instructions == "Be brief." and text_only.usage.output_tokens <= 3


def test_streaming_sends_the_sdk_event_types_in_order(client, image_data_url):
    reference = client.responses.create(model=MODEL_NAME, input=image_input(image_data_url), max_output_tokens=6,
                                        temperature=0)
    events = list(client.responses.create(model=MODEL_NAME, input=image_input(image_data_url), max_output_tokens=6,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == reference.output_text  # greedy: the same text streamed or not
    final = events[-1].response
    assert final.output_text == deltas and final.usage.output_tokens == 6
    # The SDK's stream helper (it needs a completed response: a forced call always completes).
    with client.responses.stream(model=MODEL_NAME, input="Weather in Rome?", tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=60) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and [i.type for i in final.output] == ["function_call"]


def test_tool_call_round_trip(client):
    response = client.responses.create(model=MODEL_NAME, input="Weather in Rome for two days?", tools=[WEATHER],
                                       tool_choice={"type": "function", "name": "get_weather"},
                                       max_output_tokens=60)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    args = json.loads(calls[0].arguments)
    assert args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 7
    plain = client.responses.create(model=MODEL_NAME, tools=[WEATHER], tool_choice="none", max_output_tokens=5,
                                    input="Weather in Rome for two days?")
    follow = client.responses.create(model=MODEL_NAME, tools=[WEATHER], max_output_tokens=5, input=[
        {"role": "user", "content": "Weather in Rome for two days?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 24C"},
    ], tool_choice="none")
    # The call and its output are in the prompt: more tokens than the question alone.
    assert follow.output[0].type == "message" and follow.usage.input_tokens > plain.usage.input_tokens + 10
    streamed = list(client.responses.create(model=MODEL_NAME, input="Weather in Paris?", tools=[WEATHER],
                                            tool_choice="required", max_output_tokens=60, stream=True))
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].name == "get_weather" and json.loads(done[0].arguments)["city"] in ("Paris", "Rome")
    assert streamed[-1].type == "response.completed"
    assert [i.type for i in streamed[-1].response.output] == ["function_call"]


def test_structured_output_through_text_format(client):
    response = client.responses.create(model=MODEL_NAME, input="Cat or dog?", max_output_tokens=40, text={
        "format": {"type": "json_schema", "name": "verdict", "schema": VERDICT, "strict": True}})
    value = json.loads(response.output_text)
    assert value["label"] in ("cat", "dog") and 0 <= value["confidence"] <= 100
    assert response.text.format.type == "json_schema"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "hi"}, "model"),
    ({"model": MODEL_NAME}, "input"),
    ({"model": MODEL_NAME, "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"model": MODEL_NAME, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0]"),
    ({"model": MODEL_NAME, "input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"model": MODEL_NAME, "input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice"),
    ({"model": MODEL_NAME, "input": "hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"model": MODEL_NAME, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": MODEL_NAME, "input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"model": MODEL_NAME, "input": "hi", "frobnicate": 1}, "frobnicate"),
    ({"model": "other", "input": "hi"}, "model"),
])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    reply = httpx.post(server.base_url + "/v1/responses", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_a_bad_image_is_a_400_not_a_stream(server):
    body = {"model": MODEL_NAME, "stream": True, "input": image_input("data:image/png;base64,AAAA")}
    reply = httpx.post(server.base_url + "/v1/responses", json=body, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"


class Verdict(BaseModel):
    label: str = Field(json_schema_extra={"enum": ["cat", "dog"]})
    confidence: int = Field(ge=0, le=100)


class Weather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(json_schema_extra={"enum": ["Paris", "Rome"]})
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module")
def responses_chat(server):
    return ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model=MODEL_NAME, temperature=0,
                      max_tokens=6, max_retries=0, timeout=60, use_responses_api=True)


def test_chat_openai_with_the_responses_api(responses_chat, image_data_url):
    message = HumanMessage(content=[{"type": "image_url", "image_url": {"url": image_data_url}},
                                    {"type": "text", "text": "What colour is the square?"}])
    reply = responses_chat.invoke([message])
    assert reply.text and reply.usage_metadata["output_tokens"] == 6 and reply.usage_metadata["input_tokens"] > 128
    chunks = list(responses_chat.stream([message]))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed += chunk
    assert streamed.text == reply.text and streamed.usage_metadata["output_tokens"] == 6

    tools = responses_chat.model_copy(update={"max_tokens": 60}).bind_tools([Weather], tool_choice="Weather")
    question = HumanMessage("Weather in Rome for two days?")
    call_reply = tools.invoke([question])
    [call] = call_reply.tool_calls
    assert call["name"] == "Weather" and Weather(**call["args"])
    answer = responses_chat.bind_tools([Weather]).invoke(
        [question, call_reply, ToolMessage("sunny", tool_call_id=call["id"])])
    assert answer.usage_metadata["input_tokens"] > call_reply.usage_metadata["input_tokens"]

    structured = responses_chat.model_copy(update={"max_tokens": 40}).with_structured_output(Verdict,
                                                                                             method="json_schema")
    verdict = structured.invoke("Cat or dog?")
    assert isinstance(verdict, Verdict) and verdict.label in ("cat", "dog")


@pytest.mark.parametrize("url", ["/etc/hostname", "file:///etc/hostname"])
def test_a_server_file_path_is_refused_with_the_data_url_remedy(server, url):
    for route, body in (("/v1/responses", {"model": MODEL_NAME, "input": image_input(url)}),
                        ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [
                            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})):
        reply = httpx.post(server.base_url + route, json=body, timeout=60)
        assert reply.status_code == 400, reply.text
        message = reply.json()["error"]["message"]
        assert "data: URL" in message and "ImageInputPolicy" not in message
