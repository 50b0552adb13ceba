"""Resolve a model argument to a local checkpoint directory: a local path as is, a Hugging Face id from the local
cache first and downloaded only when the machine is online (never `trust_remote_code`, never a separate SigLIP
download). A path the user meant as local that does not exist is `ModelNotFoundError` "no model directory at ...",
never a download hint."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError, ModelNotFoundError

DEFAULT_MODEL_ID = "Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5"
KNOWN_MODEL_IDS = (
    DEFAULT_MODEL_ID,
    "Salesforce/xgen-mm-phi3-mini-instruct-singleimg-r-v1.5",
    "Salesforce/xgen-mm-phi3-mini-instruct-dpo-r-v1.5",
    "Salesforce/xgen-mm-phi3-mini-base-r-v1.5",
)
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def resolve_model_dir(model: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local checkpoint directory for `model` (a path, or a Hugging Face id resolved through huggingface_hub)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not an xGen-MM checkpoint directory")
        return path
    text = str(model)
    if is_local_path(text):
        what = "is a file, not a checkpoint directory" if path.exists() else "does not exist"
        raise ModelNotFoundError(f"no model directory at {path.absolute()} ({text!r} {what}); pass the path of a "
                                 f"checkpoint directory (with config.json and *.safetensors) or a Hugging Face id "
                                 f"such as {DEFAULT_MODEL_ID}")
    if text.count("/") != 1 or not all(text.split("/")):
        raise ModelNotFoundError(f"model {text!r} is neither an existing directory nor a Hugging Face id "
                                 f"(owner/name, e.g. {DEFAULT_MODEL_ID})")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as exc:
        raise ModelNotFoundError(
            f"model {text!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}: {exc}). On a machine with network access run `xgenmm download {text}` "
            f"(or `huggingface-cli download {text}`), or pass the path of a local checkpoint directory."
        ) from exc


def is_local_path(model: str | os.PathLike) -> bool:
    """A path the user meant as a local directory: absolute, ./ ../ ~, Windows-style, an existing file or folder, or
    one whose parent folder exists (a Hugging Face id is exactly owner/name, and `owner` is not a folder here)."""
    text, path = str(model), Path(model).expanduser()
    if text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or "\\" in text or path.exists():
        return True
    return text.count("/") >= 1 and path.parent.is_dir() and str(path.parent) not in ("", ".")
