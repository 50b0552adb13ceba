"""Smoke tests: the LlamaIndex examples run end to end, offline, on a tiny random checkpoint (no --model)."""

from __future__ import annotations

import re

import pytest

from tests.support import EXAMPLES, check_rag_example_output
from tests.support import run_example as _run


def test_multimodal_rag_example():
    out = _run("llamaindex_multimodal_rag.py", "--caption-tokens", "8", "--max-tokens", "8", "--top-k", "2")
    check_rag_example_output(out, r"^caption (\S+) \((\d+)x(\d+)\)")


@pytest.mark.parametrize("agent", ["function", "react"])
def test_agent_example(agent):
    out = _run("llamaindex_agent.py", "--agent", agent)
    call = re.search(r"^tool call: image_stats\(\{'name': '([^']+)'\}\) -> (.*)$", out, re.M)
    assert call, out
    assert call.group(1) in {p.name for p in (EXAMPLES / "images").iterdir()}
    assert re.match(r"\S+: \d+x\d+ pixels, average color RGB\(\d+, \d+, \d+\)", call.group(2))
    assert re.search(r"^answer: \S", out, re.M)
