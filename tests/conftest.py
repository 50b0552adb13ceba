"""Shared fixtures: the upstream golden fixtures and random official-format checkpoints (built once per session)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures" / "xgenmm-tiny"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_cases() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text())


@pytest.fixture(scope="session")
def fixture_checkpoint_with_tokenizer(tmp_path_factory) -> Path:
    """The golden checkpoint plus the random Phi-3-layout tokenizer files (the fixture ships token ids only)."""
    import shutil

    from xgenmm.testing import save_random_tokenizer

    out = tmp_path_factory.mktemp("fixture-ckpt")
    for f in (FIXTURES / "checkpoint").iterdir():
        os.symlink(f.resolve(), out / f.name)
    save_random_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from xgenmm.testing import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", preset="tiny", seed=0)


# tests/vllm_backend runs in the separate vLLM environment (.ci/vllm.sh); the main environment has no vLLM by design.
import importlib.util as _importlib_util

collect_ignore = [] if _importlib_util.find_spec("vllm") is not None else ["vllm_backend"]
