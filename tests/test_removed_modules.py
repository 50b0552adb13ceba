"""The import aliases deprecated in 0.2 are gone in 0.3 (README "Removed in 0.3"), and nothing in the package still
needs them: importing every front end works with the old names unimportable."""

from __future__ import annotations

import importlib
import importlib.machinery
import subprocess
import sys

import pytest

import xgenmm

REMOVED = {
    "xgenmm.prompts": "xgenmm.chat.template",
    "xgenmm.tools": "xgenmm.tool_calls",
    "xgenmm.schema_budget": "xgenmm.structured.schema_budget",
    "xgenmm.image_processing": "xgenmm.multimodal.image_processing",
    "xgenmm.config": "xgenmm.model.config",
    "langchain_xgenmm.tools": "langchain_xgenmm.image_qa_tool",
}


def test_version():
    assert xgenmm.__version__ == "0.3.0"


@pytest.mark.parametrize(("old", "new"), sorted(REMOVED.items()))
def test_old_alias_is_gone_and_its_new_home_imports(old, new):
    parent, _, name = old.rpartition(".")
    # Looked up in the package's own folder (an editable install of another checkout must not answer for it).
    assert importlib.machinery.PathFinder.find_spec(name, importlib.import_module(parent).__path__) is None
    assert importlib.import_module(new).__all__


def test_every_front_end_imports_without_deprecation_warnings():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning); import xgenmm, xgenmm.server, "
            "xgenmm.chat, xgenmm.backends, xgenmm.cli.main, langchain_xgenmm, llama_index.llms.xgenmm, "
            "llama_index.readers.xgenmm, xgenmm.testing.fidelity")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
