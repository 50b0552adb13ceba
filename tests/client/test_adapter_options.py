"""Both adapters take the same (OpenAI) option names and turn them into the same request; neither loads weights
to build one."""

from __future__ import annotations

import pytest

from xgenmm.errors import SamplingParamsError
from xgenmm.sampling_params import RequestOutputKind

OPTIONS = [
    {"logprobs": True},
    {"logprobs": True, "top_logprobs": 3},
    {"max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 4},
    {"presence_penalty": 0.5, "frequency_penalty": 0.25, "n": 2},
    {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 1},
]


def _langchain(options: dict):
    from langchain_core.messages import HumanMessage
    from langchain_xgenmm import ChatXGenMM

    model = ChatXGenMM(model="/nonexistent/never-loaded", max_tokens=16)
    return model._prepare([HumanMessage("hi")], None, dict(options), RequestOutputKind.FINAL_ONLY)


def _llamaindex(options: dict):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.xgenmm import XGenMM

    model = XGenMM(model="/nonexistent/never-loaded", max_tokens=16)
    return model._request([ChatMessage(role="user", content="hi")], dict(options), RequestOutputKind.FINAL_ONLY)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_same_openai_options_same_sampling_params(options):
    lc, li = _langchain(options), _llamaindex(options)
    assert lc.params == li.params
    assert lc.messages == li.messages


def test_logprobs_mean_what_openai_says_in_both_adapters():
    assert _llamaindex({"logprobs": True}).params.logprobs == 0  # the sampled token only, as OpenAI
    assert _llamaindex({"logprobs": True, "top_logprobs": 2}).params.logprobs == 2
    assert _llamaindex({}).params.logprobs is None
    assert _llamaindex({"logprobs": 3}).params.logprobs == 3  # the 0.2 integer form keeps its meaning
    assert _langchain({"logprobs": True}).params.logprobs == 0
    with pytest.raises(SamplingParamsError, match="top_logprobs"):
        _llamaindex({"top_logprobs": 2})
    with pytest.raises(SamplingParamsError, match="top_logprobs"):
        _langchain({"top_logprobs": 2})


def test_adapters_open_no_engine_to_build_requests():
    from langchain_xgenmm import ChatXGenMM
    from llama_index.llms.xgenmm import XGenMM

    lc, li = ChatXGenMM(model="/nonexistent/x"), XGenMM(model="/nonexistent/x")
    _ = (lc._identifying_params, li.metadata)
    assert not lc._lazy_engine.is_open and not li._lazy_engine.is_open


def test_llamaindex_engine_is_a_deprecated_name_of_engine_clients(tiny_checkpoint):
    from llama_index.llms.xgenmm import XGenMM

    from xgenmm.lazy_engine import EngineClients

    llm = XGenMM(model=str(tiny_checkpoint), device="cpu", dtype="float32")
    with pytest.warns(DeprecationWarning, match="engine_clients"):
        clients = llm.engine
    assert isinstance(clients, EngineClients) and clients is llm.engine_clients
