"""Import paths: `llamaindex_xgenmm` and the LlamaIndex-conventional namespace paths, without shadowing core."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO


def test_namespace_levels_have_no_init():
    # A regular package at any of these levels would shadow llama-index-core's `llama_index.core`.
    for level in ("llama_index", "llama_index/llms", "llama_index/readers"):
        assert (REPO / level).is_dir() and not (REPO / level / "__init__.py").exists()
    assert (REPO / "llama_index/llms/xgenmm/__init__.py").exists()
    assert (REPO / "llama_index/readers/xgenmm/__init__.py").exists()


def test_installed_imports_from_another_directory(tmp_path):
    code = (
        "import llama_index.core, llama_index.llms.xgenmm as llms, llama_index.readers.xgenmm as readers\n"
        "import llamaindex_xgenmm as pkg\n"
        "from llama_index.core.llms import ChatMessage\n"
        "assert 'site-packages' in llama_index.core.__file__, llama_index.core.__file__\n"
        "assert llms.XGenMM is pkg.XGenMM and readers.XGenMMImageReader is pkg.XGenMMImageReader\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_public_names():
    import llamaindex_xgenmm

    assert set(llamaindex_xgenmm.__all__) >= {"XGenMM", "XGenMMImageReader", "READER_PROMPTS", "to_image_block"}


def test_engine_is_opened_lazily():
    from llama_index.llms.xgenmm import XGenMM

    from xgenmm.errors import CheckpointError

    llm = XGenMM(model="/nonexistent/xgenmm-checkpoint")  # building it loads nothing
    assert llm.metadata.model_name == "/nonexistent/xgenmm-checkpoint"
    with pytest.raises(CheckpointError):
        llm.complete("hi")
