"""Modules moved in 0.2 keep their old import paths for one release: same objects, and a DeprecationWarning that
names the new place."""

from __future__ import annotations

import importlib
import sys

import pytest

from xgenmm._moved import MOVED_MODULES

OLD_TO_NEW = {**MOVED_MODULES, "langchain_xgenmm.tools": "langchain_xgenmm.image_qa_tool"}


@pytest.mark.parametrize("old, new", sorted(OLD_TO_NEW.items()))
def test_old_import_path_warns_and_gives_the_same_objects(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        shim = importlib.import_module(old)
    module = importlib.import_module(new)
    names = getattr(module, "__all__")
    assert names and all(getattr(shim, n) is getattr(module, n) for n in names)


def test_the_package_itself_never_imports_a_moved_path(recwarn):
    import subprocess

    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning); import xgenmm, xgenmm.server, "
            "xgenmm.chat, xgenmm.backends, xgenmm.cli.main, langchain_xgenmm, llama_index.llms.xgenmm, "
            "llama_index.readers.xgenmm")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
