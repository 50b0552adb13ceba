"""`image_qa_tool`: the LlamaIndex image question-answering FunctionTool, free form and catalogue, sync and async,
under the XGenMM's image policy; and a FunctionAgent that uses it."""

from __future__ import annotations

import asyncio
import base64

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.tools import FunctionTool

from llamaindex_xgenmm import image_qa_tool
from xgenmm.errors import ImageError, ImageSourceNotAllowedError


def test_free_form_tool_follows_the_llm_policy(llm, image_dir, png):
    tool = image_qa_tool(llm)
    assert isinstance(tool, FunctionTool) and tool.metadata.name == "image_question_answering"
    assert set(tool.metadata.get_parameters_dict()["properties"]) == {"image", "question"}
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    out = tool.call(image=data_url, question="What color is it?")
    assert isinstance(out.raw_output, str) and out.raw_output
    with pytest.raises(ImageSourceNotAllowedError):  # a path needs XGenMM(allow_local_files=True)
        tool.call(image=str(image_dir / "red.png"), question="What color is it?")
    allowed = image_qa_tool(llm.model_copy(update={"allow_local_files": True}))
    assert allowed.call(image=str(image_dir / "red.png"), question="Color?").raw_output


def test_catalogue_tool_is_an_enum_and_reads_configured_files(llm, image_dir):
    tool = image_qa_tool(llm, images={"red": str(image_dir / "red.png"), "green": str(image_dir / "green.png")})
    schema = tool.metadata.get_parameters_dict()
    assert schema["properties"]["image"]["enum"] == ["red", "green"]
    assert tool.call(image="green", question="Color?").raw_output  # read by the tool, no allow_local_files
    out = asyncio.run(tool.acall(image="red", question="Color?"))
    assert out.raw_output
    with pytest.raises(ImageError, match="unknown image 'blue'"):
        tool.call(image="blue", question="Color?")


def test_function_agent_uses_the_image_qa_tool(model_path, image_dir):
    from llama_index.llms.xgenmm import XGenMM

    llm = XGenMM(model=model_path, device="cpu", dtype="float32", max_tokens=96)
    tool = image_qa_tool(llm, images={"red": str(image_dir / "red.png")})
    agent = FunctionAgent(tools=[tool], llm=llm, initial_tool_choice=tool.metadata.name)

    async def run():
        handler = agent.run(user_msg="What is in the red image?", max_iterations=4)
        results = [e async for e in handler.stream_events() if isinstance(e, ToolCallResult)]
        return await handler, results

    final, results = asyncio.run(run())
    assert len(results) == 1 and results[0].tool_kwargs["image"] == "red" and not results[0].tool_output.is_error
    assert results[0].tool_output.content and final.response.content is not None


def test_a_refused_local_image_names_xgenmms_own_option(llm, image_dir):
    tool = image_qa_tool(llm)
    with pytest.raises(ImageSourceNotAllowedError) as info:
        tool.call(image=str(image_dir / "red.png"), question="Color?")
    assert "XGenMM(allow_local_files=True)" in str(info.value) and "ImageInputPolicy" not in str(info.value)
