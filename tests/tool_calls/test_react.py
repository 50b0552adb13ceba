"""The core's ReAct grammar (`xgenmm.tool_calls.react`): limits derived from max_tokens make every step fit, so a
reply is never cut before it parses. Checked by sampling a random checkpoint at temperature 1 (it picks any token the
grammar allows: the adversarial case) at small and default budgets."""

from __future__ import annotations

import re

import pytest

from xgenmm.errors import SamplingParamsError
from xgenmm.tool_calls.react import (
    ReActLimits,
    observations_since_user,
    react_grammar,
    react_limits,
    react_step,
)

ADD = {"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["text"]}}}
STEP = re.compile(r"\AThought: [ -9;-~]+\n(Action: (add|note)\nAction Input: (\{.*\})|Answer: [^\n]+)\Z", re.S)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    from xgenmm import LLM

    return LLM(model=str(tiny_checkpoint), device="cpu", dtype="float32")


@pytest.mark.parametrize("max_tokens", [60, 96, 256])
@pytest.mark.parametrize("allow", [(True, False), (False, True), (True, True)])
def test_every_sampled_step_fits_max_tokens_and_parses(llm, max_tokens, allow):
    import json

    from xgenmm import SamplingParams
    from xgenmm.sampling_params import StructuredOutputsParams

    tools = [ADD, NOTE] if max_tokens >= 96 else [ADD]
    limits = react_limits(tools, max_tokens)
    grammar = react_grammar(tools, allow_action=allow[0], allow_answer=allow[1], limits=limits)
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed,
                             structured_outputs=StructuredOutputsParams(grammar=grammar)) for seed in range(4)]
    for out in llm.generate(["Question: what is 2 + 3?"] * len(params), params):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (max_tokens, completion.text)
        match = STEP.match(completion.text)
        assert match, completion.text
        if match.group(3):
            json.loads(match.group(3))


def test_limits_grow_with_max_tokens_and_respect_caps():
    small, default = react_limits([ADD], 64), react_limits([ADD], 256)
    assert small.max_argument_tokens < default.max_argument_tokens
    assert small.max_thought_chars < default.max_thought_chars and small.max_answer_chars < default.max_answer_chars
    capped = react_limits([ADD], 4096, max_thought_chars=20, max_argument_tokens=30, max_answer_chars=100)
    assert capped == ReActLimits(20, 100, 30)


def test_too_small_max_tokens_names_the_smallest_that_works():
    with pytest.raises(SamplingParamsError, match=r"max_tokens=20 .* max_tokens >= (\d+)") as info:
        react_limits([ADD], 20)
    needed = int(re.search(r">= (\d+)", str(info.value)).group(1))
    react_limits([ADD], needed)  # the number it names works
    with pytest.raises(SamplingParamsError):
        react_limits([ADD], needed - 1)


def test_step_choice_and_observation_count():
    assert react_step(0, True, 1, 2) == (True, False)
    assert react_step(1, True, 1, 2) == (True, True)
    assert react_step(2, True, 1, 2) == (False, True)
    assert react_step(0, False, 1, None) == (False, True)
    history = [("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "Observation: 5"), ("tool", "6")]
    assert observations_since_user(history) == 2
    assert observations_since_user(history[:2]) == 0
