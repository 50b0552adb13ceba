"""The layer rules (docs/architecture.md "Layer rules") hold: import-linter checks the contracts in pyproject.toml
([tool.importlinter]) on the source, so a function-level (lazy) import counts like a top-level one. The second test
proves the check has teeth: on a copy of the package with one lazy upward import, one model -> loader import and
one cycle planted, every contract reports BROKEN."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

CONTRACTS = (
    "The engine core and the model never reach up into the front ends",
    "The model never imports the engine or the checkpoint loader",
    "No import cycles among xgenmm's subpackages and modules",
)


def _lint_imports() -> str:
    script = Path(sys.executable).parent / "lint-imports"
    found = str(script) if script.is_file() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("import-linter is not installed (it is in the dev extra: pip install -e '.[dev]')")
    return found


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "core"), str(root)]))
    # run in `root`: import-linter reads the [tool.importlinter] of the pyproject.toml found there
    return subprocess.run([_lint_imports(), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_rules_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for name in CONTRACTS:
        assert f"{name} KEPT" in result.stdout


def _plant(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code + "\n")


def test_a_planted_violation_of_each_rule_is_caught(tmp_path):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "csrc")
    for package in ("core/xgenmm", "langchain_xgenmm", "llamaindex_xgenmm"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    xgenmm = tmp_path / "core" / "xgenmm"
    # lazy imports, inside functions: never executed at import time, still caught
    _plant(xgenmm / "engine" / "scheduler.py", "def _planted():\n    from ..chat import template\n    return template")
    _plant(xgenmm / "model" / "config.py", "def _planted():\n    from ..checkpoint import hub\n    return hub")
    _plant(xgenmm / "errors.py", "def _planted():\n    import xgenmm.server.app\n    return xgenmm.server.app")

    result = _lint(tmp_path)
    assert result.returncode != 0
    for name in CONTRACTS:
        assert f"{name} BROKEN" in result.stdout, result.stdout[-4000:]
    assert "xgenmm.engine.scheduler -> xgenmm.chat.template" in result.stdout
    assert "xgenmm.model.config -> xgenmm.checkpoint.hub" in result.stdout
    assert ".errors -> .server" in result.stdout
