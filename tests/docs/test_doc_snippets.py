"""Every Python snippet of README.md and docs/*.md runs, in document order (a document's snippets share one
namespace, as a reader running them one after another would), on a tiny random checkpoint.

Parsing is sybil's (`CodeBlockParser`); snippets may use top-level `await` (as in a notebook). The model id the docs
name, `Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5`, resolves to a random checkpoint through a private
Hugging Face cache, so the snippets run unchanged and offline; `sentence-transformers/all-MiniLM-L6-v2` (the
embedding the RAG snippets name) resolves the same way to a tiny RANDOM sentence-transformers model (a stand-in
for these tests only: retrieval order means nothing, the plumbing is real). Snippets run in a folder holding `examples/` (the
repo's) and `photos/` (copies of the example images). A snippet that needs something CI does not have says so on its
first line, visibly in the docs: `# needs: network`, `# needs: gpu`, `# needs: vllm` or `# needs: server` (the test
starts `xgenmm serve`'s app on 127.0.0.1:8000 with the key and name the docs use); the test reports the skip and its
reason when the need is not met (network: set XGENMM_DOCS_NETWORK=1).
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import os
import shutil
import socket
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
DEFAULT_MODEL_ID = "Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5"
NEEDS = "# needs:"


def _evaluate(example) -> None:
    """Run a snippet in its document's namespace; top-level `await` runs on a fresh event loop."""
    source = "\n" * (example.line + example.parsed.line_offset) + example.parsed
    code = compile(source, example.path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    result = eval(code, example.namespace)
    if inspect.iscoroutine(result):
        asyncio.run(result)
    example.namespace.pop("__builtins__", None)


_SYBIL = Sybil(parsers=[CodeBlockParser("python", evaluator=_evaluate)], path=str(REPO), patterns=DOCUMENTS)


def _snippets() -> list:
    cases = []
    for name in DOCUMENTS:
        document = _SYBIL.parse(REPO / name)
        for index, example in enumerate(document):
            cases.append(pytest.param(name, index, id=f"{name}:{example.line}"))
    return cases


def _unmet(needs: list[str]) -> str | None:
    import torch

    for need in needs:
        if need == "network" and os.environ.get("XGENMM_DOCS_NETWORK") != "1":
            return "needs network (set XGENMM_DOCS_NETWORK=1 to run it)"
        if need == "gpu" and not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if need == "vllm" and importlib.util.find_spec("vllm") is None:
            return "needs vLLM (installed only in .ci/vllm.sh's .venv-vllm, which runs tests/vllm_backend)"
        if need not in ("network", "gpu", "vllm", "server"):
            raise AssertionError(f"unknown '# needs: {need}' marker")
    return None


@pytest.fixture(scope="module")
def doc_env(tmp_path_factory, tiny_checkpoint):
    """A Hugging Face cache where the docs' model id is the random checkpoint, and the folder snippets run in."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo_dir = cache / ("models--" + DEFAULT_MODEL_ID.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(tiny_checkpoint, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    _random_sentence_transformer(cache, tmp_path_factory.mktemp("st-build"))
    workdir = tmp_path_factory.mktemp("docs-run")
    (workdir / "examples").symlink_to(REPO / "examples")
    photos = workdir / "photos"
    photos.mkdir()
    images = REPO / "examples" / "images"
    for source, name in (("house.png", "house.png"), ("stop_sign.jpg", "cat.jpg"), ("bar_chart.png", "chart.png")):
        shutil.copy(images / source, photos / name)
    return {"cache": str(cache), "workdir": workdir, "documents": {}}


def _random_sentence_transformer(cache: Path, scratch: Path) -> None:
    """A tiny random BERT + mean pooling saved as `sentence-transformers/all-MiniLM-L6-v2` in `cache`."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    (scratch / "vocab.txt").write_text("\n".join(words))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    BertModel(config).save_pretrained(scratch / "bert")
    BertTokenizerFast(vocab_file=str(scratch / "vocab.txt")).save_pretrained(scratch / "bert")
    transformer = models.Transformer(str(scratch / "bert"))
    model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension(), "mean"),
                                         models.Normalize()])
    repo_dir = cache / "models--sentence-transformers--all-MiniLM-L6-v2"
    commit = "1" * 40
    model.save(str(repo_dir / "snapshots" / commit))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)


@pytest.fixture
def in_doc_env(doc_env, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_CACHE", doc_env["cache"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LLAMA_INDEX_CACHE_DIR", doc_env["cache"])  # HuggingFaceEmbedding's cache_folder
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", doc_env["cache"])
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(doc_env["workdir"])
    return doc_env


@pytest.fixture(scope="module")
def docs_server(tiny_checkpoint):
    """`xgenmm serve --api-key s3cret --served-model-name xgenmm` on 127.0.0.1:8000, as the docs' clients expect."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8000))
        except OSError:
            yield None
            return
    from xgenmm.server import BackgroundServer, ServerConfig

    config = ServerConfig(model=str(tiny_checkpoint), served_model_name="xgenmm", device="cpu", dtype="float32",
                          port=8000, api_key="s3cret")
    with BackgroundServer(config) as server:
        yield server


def _needs(example) -> list[str]:
    lines = example.parsed.lstrip().splitlines()
    first = lines[0] if lines else ""
    if not first.startswith(NEEDS):
        return []
    return [n.strip() for n in first[len(NEEDS):].split("(")[0].split(",") if n.strip()]  # "(why)" is for readers


@pytest.mark.parametrize(("document", "index"), _snippets())
def test_doc_snippet_runs(document, index, in_doc_env, request):
    state = in_doc_env["documents"].get(document)
    if state is None:
        state = in_doc_env["documents"][document] = {"examples": list(_SYBIL.parse(REPO / document)), "done": set()}
    examples = state["examples"]
    example = examples[index]
    reason = _unmet(_needs(example))
    if reason is None and "server" in _needs(example) and request.getfixturevalue("docs_server") is None:
        reason = "needs 127.0.0.1:8000 free for the docs' server"
    if reason is not None:
        state["done"].add(index)
        pytest.skip(f"{document} snippet at line {example.line}: {reason}")
    # A reader runs a document's snippets in order: run the earlier ones first (when this test runs alone).
    for earlier in range(index):
        if earlier not in state["done"] and _unmet(_needs(examples[earlier])) is None:
            state["done"].add(earlier)
            examples[earlier].evaluate()
    state["done"].add(index)
    example.evaluate()
