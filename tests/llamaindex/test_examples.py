"""Smoke tests: the LlamaIndex examples run end to end, offline, on a tiny random checkpoint (no --model)."""

from __future__ import annotations

import re

import pytest

from tests.support import check_rag_example_output
from tests.support import run_example as _run


def test_multimodal_rag_example():
    out = _run("llamaindex_multimodal_rag.py", "--caption-tokens", "8", "--max-tokens", "8", "--top-k", "2")
    check_rag_example_output(out, r"^caption (\S+) \((\d+)x(\d+)\)")


@pytest.mark.parametrize(("agent", "max_tokens"), [("function", "256"), ("react", "256"), ("react", "64")])
def test_agent_example(agent, max_tokens):
    # --agent react --max-tokens 64: the ReAct limits derived from max_tokens make every reply fit, so it finishes.
    out = _run("llamaindex_agent.py", "--agent", agent, "--max-tokens", max_tokens)
    call = re.search(r"^tool call: image_stats\(\{\}\) -> (.*)$", out, re.M)
    assert call, out
    assert re.match(r"stop_sign.jpg: \d+x\d+ pixels, average color RGB\(\d+, \d+, \d+\)", call.group(1))
    assert re.search(r"^answer: \S", out, re.M)
