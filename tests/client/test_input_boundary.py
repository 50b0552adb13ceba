"""The boundary rule on every front end's path, not only the server's: whatever the input work of one request raises
(rendering, tokenizing, decoding) reaches the caller as a typed xgenmm error, and the engine serves the next request.
The sync `LLM` path is checked here because it does not go through the server's body checks or `run_input_work`."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xgenmm import LLM, SamplingParams, XGenMMError

# Any code point, lone surrogates and NULs included (hypothesis leaves surrogates out unless asked).
HOSTILE_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()),
                       max_size=40)
PARAMS = SamplingParams(temperature=0.0, max_tokens=2)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), device="cpu", dtype="float32")


def test_lone_surrogate_is_a_typed_error_on_the_sync_paths(llm):
    with pytest.raises(XGenMMError):
        llm.chat([{"role": "user", "content": "hi \ud800 there"}], PARAMS)
    with pytest.raises(XGenMMError):
        llm.generate("<|user|>\n\udfff<|end|>\n<|assistant|>\n", PARAMS)
    assert len(llm.chat([{"role": "user", "content": "hi"}], PARAMS)[0].outputs[0].token_ids) == 2


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=HOSTILE_TEXT)
def test_any_text_is_answered_or_refused_typed(llm, text):
    try:
        out = llm.chat([{"role": "user", "content": text}], PARAMS)[0]
    except XGenMMError:
        return
    assert out.finished and 1 <= len(out.outputs[0].token_ids) <= 2
