"""Smoke tests: the LlamaIndex examples run end to end, offline, on a tiny random checkpoint (no --model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_multimodal_rag_example():
    out = _run("llamaindex_multimodal_rag.py", "--caption-tokens", "8", "--max-tokens", "8", "--top-k", "2")
    images = sorted(p.name for p in (EXAMPLES / "images").iterdir())
    captioned = re.findall(r"^caption (\S+) \((\d+)x(\d+)\)", out, re.M)
    assert sorted(name for name, _, _ in captioned) == images
    retrieved = re.findall(r"^retrieved (\S+) score=", out, re.M)
    assert len(retrieved) == 2 and set(retrieved) <= set(images)
    usage = re.search(r"^usage: prompt=(\d+) completion=(\d+)", out, re.M)
    assert usage and int(usage.group(2)) >= 1
    assert int(usage.group(1)) > 2 * 128  # the two retrieved images are in the answer's prompt
    assert re.search(r"^answer: \S", out, re.M)


@pytest.mark.parametrize("agent", ["function", "react"])
def test_agent_example(agent):
    out = _run("llamaindex_agent.py", "--agent", agent)
    call = re.search(r"^tool call: image_stats\(\{'name': '([^']+)'\}\) -> (.*)$", out, re.M)
    assert call, out
    assert call.group(1) in os.listdir(EXAMPLES / "images")
    assert re.match(r"\S+: \d+x\d+ pixels, average color RGB\(\d+, \d+, \d+\)", call.group(2))
    assert re.search(r"^answer: \S", out, re.M)
