"""Smoke tests: the LangChain examples run end to end, offline, on a tiny random checkpoint (no --model)."""

from __future__ import annotations

import re

from tests.support import EXAMPLES, check_rag_example_output
from tests.support import run_example as _run


def test_chain_example():
    out = _run("langchain_chain.py", "--max-tokens", "8")
    assert re.search(r"^text: '\S", out, re.M) and re.search(r"^image: '\S", out, re.M)
    streamed = re.search(r"^streamed (\d+) pieces:", out, re.M)
    assert streamed and int(streamed.group(1)) >= 2
    assert len(re.findall(r"^batch\[", out, re.M)) == 3


def test_multimodal_rag_example():
    out = _run("langchain_multimodal_rag.py", "--caption-tokens", "8", "--max-tokens", "8", "--top-k", "2")
    check_rag_example_output(out, r"^caption (\S+) \((\d+)x(\d+), image/\w+\)")


def test_agent_example():
    out = _run("langchain_agent.py")  # the default budget fits a complete (grammar-bounded) tool call
    call = re.search(r"^tool call: image_question_answering\(\{'image': '([^']+)', 'question': ", out, re.M)
    assert call, out
    assert call.group(1) in {p.stem for p in (EXAMPLES / "images").iterdir()}
    assert re.search(r"^tool result: '", out, re.M) and "not allowed" not in out
    assert re.search(r"^answer: ", out, re.M)  # a random model may end its answer at once
