"""The vLLM backend gets the same requests as the native engine from the shared request builder: the conformance
cases of tests/chat/test_front_end_conformance.py (text, image, tools with each tool_choice, structured output,
stop strings, n, logprobs) give identical prompt token ids, sampling parameters and greedy tokens on both engines.

Runs only where vLLM is installed (`.venv-vllm`, via `.ci/vllm.sh`).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.chat.conformance_cases import CASES, MAX_TOKENS, Case  # noqa: E402
from xgenmm.lazy_engine import EngineClients  # noqa: E402
from xgenmm.chat import build_chat_request, chat_choice  # noqa: E402


class _SubmitSpy:
    """Records (prompt ids, params) of every request the handle submits to its engine core."""

    def __init__(self, handle):
        self.handle, self.records, self._submit = handle, [], handle.submit
        handle.submit = self

    def __call__(self, prepared, sink):
        self.records.append((list(prepared.prompt_token_ids), prepared.params))
        return self._submit(prepared, sink)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    vllm_engine = EngineClients.open("vllm", model=str(tiny_checkpoint), dtype="float32", max_model_len=4096)
    native_engine = EngineClients.open("native", model=str(tiny_checkpoint), device="cpu", dtype="float32")
    spies = _SubmitSpy(vllm_engine.handle), _SubmitSpy(native_engine.handle)
    yield (vllm_engine, native_engine), spies
    vllm_engine.handle.shutdown()
    for spy in spies:
        del spy.handle.submit


def _request(case: Case):
    sampling = {"temperature": 0.0, "max_tokens": MAX_TOKENS, "seed": 1, "n": case.n, "stop": case.stop}
    if case.top_logprobs is not None:
        sampling.update(logprobs=True, top_logprobs=case.top_logprobs)
    return build_chat_request(case.messages, sampling=sampling, tools=case.tools, tool_choice=case.tool_choice,
                              response_format=case.response_format)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_vllm_backend_gets_the_native_request(case, engines):
    (vllm_engine, native_engine), (vllm_spy, native_spy) = engines
    request = _request(case)
    v = vllm_engine.sync.chat(request)[0]
    n = native_engine.sync.chat(request)[0]
    assert vllm_spy.records[-1] == native_spy.records[-1]  # prompt ids and sampling params
    assert [o.token_ids for o in v.outputs] == [o.token_ids for o in n.outputs]
    v_choice, n_choice = chat_choice(v.outputs[0], request.tools), chat_choice(n.outputs[0], request.tools)
    assert (v_choice.finish_reason, [c.name for c in v_choice.tool_calls]) == \
        (n_choice.finish_reason, [c.name for c in n_choice.tool_calls])
