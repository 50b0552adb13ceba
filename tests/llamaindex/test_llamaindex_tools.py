"""Function calling: tool specs in the prompt, grammar-forced calls, parsing, history round trip, structured output."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, ImageBlock, TextBlock, ToolCallBlock
from llama_index.core.bridge.pydantic import BaseModel, Field
from llama_index.core.prompts import ChatPromptTemplate, PromptTemplate
from llama_index.core.tools import FunctionTool

from llamaindex_xgenmm.messages import to_core_messages


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def describe_color(color: str) -> str:
    """Say something about a color."""
    return f"{color} is a nice color"


class Pet(BaseModel):
    """A pet."""

    name: str
    age: int = Field(ge=0, le=40)
    kind: str = Field(json_schema_extra={"enum": ["cat", "dog", "bird"]})


TOOLS = [FunctionTool.from_defaults(fn=add), FunctionTool.from_defaults(fn=describe_color)]


@pytest.fixture(scope="module")
def tool_llm(model_path):
    from llama_index.llms.xgenmm import XGenMM

    return XGenMM(model=model_path, device="cpu", dtype="float32", max_tokens=128)


def test_prepare_chat_with_tools_does_not_mutate_history(tool_llm):
    history = [ChatMessage(role="user", content="earlier")]
    kwargs = tool_llm._prepare_chat_with_tools(TOOLS, user_msg="now", chat_history=history, tool_required=True)
    assert len(history) == 1 and [m.content for m in kwargs["messages"]] == ["earlier", "now"]
    assert [t["function"]["name"] for t in kwargs["tools"]] == ["add", "describe_color"]
    assert kwargs["tool_choice"] == "required"


def test_tools_reach_the_prompt(tool_llm):
    plain = tool_llm.chat([ChatMessage(role="user", content="hi")], max_tokens=1)
    with_tools = tool_llm.chat_with_tools(TOOLS, user_msg="hi", max_tokens=1)
    # The tool schemas are rendered into the system turn (hundreds of tokens), not silently ignored.
    assert with_tools.additional_kwargs["prompt_tokens"] > plain.additional_kwargs["prompt_tokens"] + 50


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_required_tool_call_is_constrained_and_parsed(tool_llm, mode):
    if mode == "sync":
        response = tool_llm.chat_with_tools(TOOLS, user_msg="What is 2 + 3?", tool_required=True)
    else:
        response = asyncio.run(tool_llm.achat_with_tools(TOOLS, user_msg="What is 2 + 3?", tool_required=True))
    # A random model emits gibberish; the grammar still makes it a well-formed call of a known tool.
    assert response.raw["text"].startswith("<tool_call>\n{\"name\": ")
    calls = tool_llm.get_tool_calls_from_response(response)
    assert len(calls) == 1 and calls[0].tool_name in ("add", "describe_color")
    tool = next(t for t in TOOLS if t.metadata.name == calls[0].tool_name)
    output = tool(**calls[0].tool_kwargs)  # arguments match the schema: the function runs
    assert not output.is_error
    blocks = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    assert [b.tool_call_id for b in blocks] == [calls[0].tool_id]
    assert response.message.additional_kwargs["tool_calls"][0]["function"]["name"] == calls[0].tool_name


def test_tool_choice_by_name_forces_that_tool(tool_llm):
    response = tool_llm.chat_with_tools(TOOLS, user_msg="Tell me about red", tool_choice="describe_color")
    calls = tool_llm.get_tool_calls_from_response(response)
    assert [c.tool_name for c in calls] == ["describe_color"] and isinstance(calls[0].tool_kwargs["color"], str)


def test_streamed_tool_call(tool_llm):
    chunks = list(tool_llm.stream_chat_with_tools(TOOLS, user_msg="2+3?", tool_required=True))
    assert all(tool_llm.get_tool_calls_from_response(c, error_on_no_tool_call=False) == [] for c in chunks[:-1])
    calls = tool_llm.get_tool_calls_from_response(chunks[-1])
    assert len(calls) == 1 and calls[0].tool_name in ("add", "describe_color")


def test_predict_and_call_runs_the_tool(tool_llm):
    result = tool_llm.predict_and_call([TOOLS[0]], user_msg="What is 2 + 3?", tool_required=True)
    assert len(result.sources) == 1 and result.sources[0].tool_name == "add"
    kwargs = result.sources[0].raw_input["kwargs"]
    assert result.response == str(kwargs["a"] + kwargs["b"])


def test_no_tool_call_gives_empty_list_or_clear_error(tool_llm):
    response = ChatResponse(message=ChatMessage(role="assistant", content="no calls",
                                                additional_kwargs={"tool_calls": []}))
    assert tool_llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="Expected at least one tool call"):
        tool_llm.get_tool_calls_from_response(response)


def test_parallel_calls_are_cut_to_one_unless_allowed(tool_llm):
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>')
    from llamaindex_xgenmm.responses import _assistant_message
    from xgenmm.chat import chat_choice
    from xgenmm.outputs import CompletionOutput

    tool_specs = [t.metadata.to_openai_tool() for t in TOOLS]
    both = ChatResponse(message=_assistant_message(chat_choice(CompletionOutput(0, text, [], finish_reason="stop"),
                                                               tool_specs)))
    assert len(tool_llm.get_tool_calls_from_response(both)) == 2
    one = tool_llm._validate_chat_with_tools_response(both.model_copy(deep=True), TOOLS)
    assert [c.tool_kwargs for c in tool_llm.get_tool_calls_from_response(one)] == [{"a": 1, "b": 2}]


def test_tool_history_round_trips_to_the_core(tool_llm):
    response = tool_llm.chat_with_tools(TOOLS, user_msg="2+3?", tool_choice="add")
    call = tool_llm.get_tool_calls_from_response(response)[0]
    history = [
        ChatMessage(role="user", content="2+3?"),
        response.message,
        ChatMessage(role="tool", content="5", additional_kwargs={"tool_call_id": call.tool_id, "name": "add"}),
    ]
    core = to_core_messages(history)
    assert core[1]["tool_calls"][0]["id"] == call.tool_id
    assert core[1]["tool_calls"][0]["function"]["name"] == "add"
    assert core[2] == {"role": "tool", "content": "5", "tool_call_id": call.tool_id, "name": "add"}
    follow = tool_llm.chat_with_tools(TOOLS, chat_history=history, max_tokens=4)
    # The call and its result are in the prompt of the next turn.
    assert follow.additional_kwargs["prompt_tokens"] > response.additional_kwargs["prompt_tokens"]


def test_tool_result_with_an_image(tool_llm, png):
    text_result = ChatMessage(role="tool", content="here", additional_kwargs={"tool_call_id": "c1"})
    image_result = ChatMessage(role="tool", blocks=[TextBlock(text="here"), ImageBlock(image=png)],
                               additional_kwargs={"tool_call_id": "c1"})
    call = ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="c1", tool_name="add",
                                                               tool_kwargs={"a": 1, "b": 2})])
    user = ChatMessage(role="user", content="go")
    a = tool_llm.chat_with_tools(TOOLS, chat_history=[user, call, text_result], max_tokens=1)
    b = tool_llm.chat_with_tools(TOOLS, chat_history=[user, call, image_result], max_tokens=1)
    assert b.additional_kwargs["prompt_tokens"] > a.additional_kwargs["prompt_tokens"] + 100


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_structured_predict_returns_a_valid_object(tool_llm, mode):
    prompt = PromptTemplate("Invent a pet named {name}.")
    if mode == "sync":
        pet = tool_llm.structured_predict(Pet, prompt, name="Rex")
    else:
        pet = asyncio.run(tool_llm.astructured_predict(Pet, prompt, name="Rex"))
    assert isinstance(pet, Pet) and 0 <= pet.age <= 40 and pet.kind in ("cat", "dog", "bird")


def test_as_structured_llm_with_an_image(tool_llm, png):
    structured = tool_llm.as_structured_llm(Pet)
    message = ChatMessage(role="user", blocks=[ImageBlock(image=png), TextBlock(text="Which pet is this?")])
    response = structured.chat([message])
    assert isinstance(response.raw, Pet)
    assert Pet.model_validate_json(response.message.content) == response.raw


def test_structured_outputs_default_constrains_plain_chat(model_path):
    from llama_index.llms.xgenmm import XGenMM

    from xgenmm import StructuredOutputsParams

    llm = XGenMM(model=model_path, device="cpu", dtype="float32", max_tokens=8,
                 structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    answer = llm.chat([ChatMessage(role="user", content="Is it red?")]).message.content
    assert answer in ("yes", "no")
    chooser = XGenMM(model=model_path, device="cpu", dtype="float32", max_tokens=8,
                     structured_outputs=lambda messages: StructuredOutputsParams(choice=[str(len(messages))]))
    assert chooser.chat([ChatMessage(role="user", content="a"), ChatMessage(role="user", content="b")]
                        ).message.content == "2"


def test_chat_prompt_template_keeps_images(tool_llm, png):
    template = ChatPromptTemplate([ChatMessage(role="user", blocks=[ImageBlock(image=png), TextBlock(text="{q}")])])
    response = tool_llm.chat(template.format_messages(q="What is it?"), max_tokens=1)
    plain = tool_llm.chat([ChatMessage(role="user", content="What is it?")], max_tokens=1)
    assert response.additional_kwargs["prompt_tokens"] > plain.additional_kwargs["prompt_tokens"] + 100
