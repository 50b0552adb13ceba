"""FunctionAgent and ReActAgent (llama_index.core.agent.workflow) complete a loop with a tool on XGenMM.

A random checkpoint cannot decide to use a tool, so each test says who decides what:
* FunctionAgent: `initial_tool_choice` (a FunctionAgent option) forces a call on the first turn; the core's grammar
  makes it a valid call, the agent runs the tool, feeds the result back, and the model's next (free) reply ends it.
* ReActAgent parses text. `ReActConstraint(min_tool_calls=1, max_tool_calls=1)` picks the grammar per turn: an action
  on the first turn, an answer after one observation. The model writes the thought, the arguments and the answer.
"""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.bridge.pydantic import BaseModel, Field
from llama_index.core.tools import FunctionTool

from llamaindex_xgenmm.react import ReActConstraint, observations_since_user, react_grammar


class ColorArgs(BaseModel):
    name: str = Field(description="image file name", json_schema_extra={"enum": ["red.png", "green.png"]})


def _tools(image_dir, calls):
    def dominant_color(name: str) -> str:
        """The dominant RGB color of one of the user's images."""
        from PIL import Image

        calls.append(name)
        with Image.open(image_dir / name) as img:
            return str(img.convert("RGB").getpixel((0, 0)))

    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    return [FunctionTool.from_defaults(fn=dominant_color, fn_schema=ColorArgs), FunctionTool.from_defaults(fn=add)]


async def _run(agent, user_msg):
    handler = agent.run(user_msg=user_msg, max_iterations=6)
    results, outputs = [], []
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            results.append(event)
        elif isinstance(event, AgentOutput):
            outputs.append(event)
    final = await handler
    return final, results, outputs


@pytest.mark.parametrize("streaming", [True, False])
def test_function_agent_loop_with_a_tool_on_an_image(model_path, image_dir, png, streaming):
    from llama_index.llms.xgenmm import XGenMM

    llm = XGenMM(model=model_path, device="cpu", dtype="float32", max_tokens=64)
    calls: list = []
    tools = _tools(image_dir, calls)
    agent = FunctionAgent(tools=tools, llm=llm, initial_tool_choice="dominant_color", streaming=streaming)
    question = ChatMessage(role="user", blocks=[ImageBlock(image=png), TextBlock(text="What color is red.png?")])
    final, results, outputs = asyncio.run(_run(agent, question))
    # Turn 1: a forced, well-formed call that really ran; turn 2: the model's own reply ends the loop.
    assert len(results) == 1 and results[0].tool_name == "dominant_color"
    assert calls == [results[0].tool_kwargs["name"]] and results[0].tool_kwargs["name"] in ("red.png", "green.png")
    assert results[0].tool_output.content in ("(220, 30, 30)", "(30, 200, 60)")
    # Two model turns: the first selected the tool; the second is the final output (its tool_calls field lists the
    # results of the run), whose message makes no further call.
    assert len(outputs) == 2 and [c.tool_name for c in outputs[0].tool_calls] == ["dominant_color"]
    assert final.response.role == MessageRole.ASSISTANT and final.response.content
    assert final.response.additional_kwargs["tool_calls"] == []
    assert not any(isinstance(b, ToolCallBlock) for b in final.response.blocks)


def test_react_agent_loop_with_a_tool(model_path, image_dir):
    from llama_index.llms.xgenmm import XGenMM

    calls: list = []
    tools = _tools(image_dir, calls)
    constraint = ReActConstraint(tools, min_tool_calls=1, max_tool_calls=1, max_thought_chars=40,
                                 max_answer_chars=60, max_argument_tokens=24)
    llm = XGenMM(model=model_path, device="cpu", dtype="float32", max_tokens=96, structured_outputs=constraint)
    agent = ReActAgent(tools=tools, llm=llm)
    final, results, outputs = asyncio.run(_run(agent, "Which color is green.png, and what is 2 + 3?"))
    # The text the model wrote parsed as an action; the agent called the tool, observed, then parsed an answer.
    assert len(results) == 1 and not results[0].tool_output.is_error
    assert results[0].tool_name in ("dominant_color", "add") and calls
    assert len(outputs) == 2 and [c.tool_name for c in outputs[0].tool_calls] == [results[0].tool_name]
    assert final.response.content and "Observation" not in final.response.content


def test_react_constraint_picks_the_step_from_the_conversation():
    tools = [FunctionTool.from_defaults(fn=lambda a, b: a + b, name="add", description="Add.")]
    constraint = ReActConstraint(tools, min_tool_calls=1, max_tool_calls=2)
    system = ChatMessage(role="system", content="... Action: tool\nAction Input: {...} ...")
    user = ChatMessage(role="user", content="2+3?")
    step = ChatMessage(role="assistant", content="Thought: add\nAction: add\nAction Input: {\"a\": 2, \"b\": 3}")
    seen = ChatMessage(role="user", content="Observation: 5")
    assert constraint([user]) is None  # not a ReAct prompt: left alone
    first = constraint([system, user]).grammar
    assert "action" in first.split("\n")[1] and "answer" not in first.split("\n")[1]
    middle = constraint([system, user, step, seen]).grammar
    assert "(action | answer)" in middle
    last = constraint([system, user, step, seen, step, seen]).grammar
    assert "answer" in last.split("\n")[1] and "action" not in last.split("\n")[1]
    assert observations_since_user([system, user, step, seen, step, seen]) == 2
    with pytest.raises(ValueError, match="allow an action, an answer or both"):
        react_grammar(tools, allow_action=False, allow_answer=False)


def test_documented_react_recipe_finishes_at_the_default_max_tokens(model_path):
    """docs/llamaindex.md's recipe as written: default max_tokens, one `add` tool, min 1 / max 3 tool calls."""
    from llama_index.llms.xgenmm import XGenMM

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    tool = FunctionTool.from_defaults(fn=add)
    llm = XGenMM(model=model_path, device="cpu", dtype="float32",
                 structured_outputs=ReActConstraint([tool], min_tool_calls=1, max_tool_calls=3))
    final, results, outputs = asyncio.run(_run(ReActAgent(tools=[tool], llm=llm), "What is 2 + 3?"))
    assert 1 <= len(results) <= 3 and all(not r.tool_output.is_error for r in results)
    assert all(r.tool_output.raw_output == r.tool_kwargs["a"] + r.tool_kwargs["b"] for r in results)
    assert final.response.content and "Observation" not in final.response.content


def test_react_constraint_limits_follow_the_calls_max_tokens():
    tools = [FunctionTool.from_defaults(fn=lambda a, b: a + b, name="add", description="Add.")]
    constraint = ReActConstraint(tools, max_thought_chars=50)
    small, large = constraint.limits(64), constraint.limits(1024)
    assert small.max_argument_tokens < large.max_argument_tokens and small.max_thought_chars <= large.max_thought_chars
    assert large.max_thought_chars == 50  # the explicit cap holds
    system = ChatMessage(role="system", content="... Action Input: {...} ...")
    grammar = constraint([system, ChatMessage(role="user", content="2+3?")], max_tokens=64).grammar
    assert f"{{1,{small.max_thought_chars}}}" in grammar
