"""`parse_responses_request` on arbitrary JSON: a valid request or an OpenAIError 400 naming a field, never another
exception (which the server would turn into a 500)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from xgenmm.server.errors import OpenAIError
from xgenmm.server.responses_api import parse_responses_request

JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)
FIELDS = ["model", "input", "instructions", "tools", "tool_choice", "text", "max_output_tokens", "temperature",
          "top_p", "stream", "parallel_tool_calls", "previous_response_id"]
ITEM = st.fixed_dictionaries({}, optional={"type": st.sampled_from(["message", "function_call", "function_call_output",
                                                                     "reasoning", "input_file"]) | JSON,
                                           "role": st.sampled_from(["user", "assistant", "developer", "x"]) | JSON,
                                           "content": JSON | st.lists(st.fixed_dictionaries(
                                               {"type": st.sampled_from(["input_text", "input_image", "x"])},
                                               optional={"text": JSON, "image_url": JSON}), max_size=2),
                                           "call_id": JSON, "name": JSON, "arguments": JSON, "output": JSON})
BODY = st.fixed_dictionaries({"model": st.just("m") | JSON},
                             optional={name: JSON for name in FIELDS[2:]} | {"input": st.lists(ITEM, max_size=3) | JSON})


@settings(max_examples=int(os.environ.get("XGENMM_FUZZ_EXAMPLES", "150")), deadline=None)
@given(BODY)
def test_any_body_is_a_request_or_a_400_naming_a_field(body):
    try:
        request = parse_responses_request(body)
    except OpenAIError as exc:
        assert exc.status == 400 and exc.message
        return
    assert request.model == body["model"] and request.chat.messages
