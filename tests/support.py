"""Paths and helpers shared by the test packages (`from tests.support import ...`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
XGENMM_TINY = FIXTURES / "xgenmm-tiny"  # the upstream golden fixtures
TOKENIZER_FIXTURES = FIXTURES / "tokenizer"  # upstream prompt-tokenization golden data
EXAMPLES = REPO / "examples"


def run_example(script: str, *args: str, timeout: float = 300) -> str:
    """Run `examples/<script>` offline on its default tiny random checkpoint; return its stdout (asserting exit 0)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def check_rag_example_output(out: str, caption_line: str) -> None:
    """What both multimodal-RAG examples print: a caption line per image (`caption_line` is its regex, the image file
    name as group 1), the top-2 retrieved images, the usage of the answer (the retrieved images in its prompt), the
    answer."""
    import re

    images = sorted(p.name for p in (EXAMPLES / "images").iterdir())
    captioned = re.findall(caption_line, out, re.M)
    assert sorted(match[0] if isinstance(match, tuple) else match for match in captioned) == images
    retrieved = re.findall(r"^retrieved (\S+) score=", out, re.M)
    assert len(retrieved) == 2 and set(retrieved) <= set(images)
    usage = re.search(r"^usage: prompt=(\d+) completion=(\d+)", out, re.M)
    assert usage and int(usage.group(2)) >= 1
    assert int(usage.group(1)) > 2 * 128  # the two retrieved images are in the answer's prompt
    assert re.search(r"^answer: \S", out, re.M)
