"""The server driven by `langchain-openai`'s `ChatOpenAI`: image messages, streaming with usage, bound tools,
structured output through json_schema, and errors surfacing as the OpenAI client's exceptions."""

from __future__ import annotations

from typing import Literal

import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.server.support import MODEL_NAME


class Weather(BaseModel):
    """Get the current weather in a city."""

    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


class Verdict(BaseModel):
    label: Literal["cat", "dog", "bird"]
    confidence: int = Field(ge=0, le=100)


@pytest.fixture(scope="module")
def chat(server):
    return ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model=MODEL_NAME, temperature=0,
                      max_tokens=6, max_retries=0, timeout=60)


def test_invoke_and_stream_an_image_question(chat, image_data_url):
    message = HumanMessage(content=[{"type": "image_url", "image_url": {"url": image_data_url}},
                                    {"type": "text", "text": "What colour is the square?"}])
    reply = chat.invoke([message])
    assert isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["model_name"] == MODEL_NAME
    assert reply.response_metadata["finish_reason"] == "length"
    assert reply.usage_metadata["output_tokens"] == 6 and reply.usage_metadata["input_tokens"] > 128

    chunks = list(chat.stream([message], stream_usage=True))
    streamed = chunks[0]
    for c in chunks[1:]:
        streamed += c
    assert streamed.content == reply.content  # greedy: same text streamed or not
    assert streamed.usage_metadata["output_tokens"] == 6
    assert streamed.usage_metadata["input_tokens"] == reply.usage_metadata["input_tokens"]


def test_bound_tools_give_tool_calls_and_the_loop_continues(chat):
    model = chat.bind_tools([Weather], tool_choice="Weather").bind(max_tokens=60)
    question = HumanMessage("Weather in Rome for two days?")
    reply = model.invoke([question])
    [call] = reply.tool_calls
    assert call["name"] == "Weather" and call["id"]
    assert Weather(**call["args"])  # arguments validate against the tool's schema
    assert not reply.invalid_tool_calls

    streamed = None
    for chunk in model.stream([question]):
        streamed = chunk if streamed is None else streamed + chunk
    [scall] = streamed.tool_calls
    assert scall["name"] == "Weather" and Weather(**scall["args"])

    answer = chat.invoke([question, reply, ToolMessage("Sunny, 24 C", tool_call_id=call["id"])])
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls


def test_structured_output_with_json_schema(chat):
    structured = chat.model_copy(update={"max_tokens": 40}).with_structured_output(Verdict, method="json_schema")
    verdict = structured.invoke("Is this a cat, a dog or a bird? Answer with a label and a confidence.")
    assert isinstance(verdict, Verdict)
    assert 0 <= verdict.confidence <= 100


def test_errors_surface_as_openai_exceptions(server):
    wrong_model = ChatOpenAI(base_url=server.base_url + "/v1", api_key="unused", model="not-served", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        wrong_model.invoke("hi")
    assert exc.value.response.json()["error"]["code"] == "model_not_found"
