"""`xgenmm download [MODEL]`: fetch a checkpoint's json / safetensors / tokenizer files from the Hugging Face Hub."""

from __future__ import annotations

import argparse
import os

from ..checkpoint.hub import DOWNLOAD_PATTERNS
from .common import CLIError, default_model, eprint


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("download", help="download a model from the Hugging Face Hub (needs network access)",
                              description=__doc__)
    p.add_argument("model_id", nargs="?", metavar="MODEL", help="Hugging Face id (default: --model)")
    p.add_argument("--model", "-m", default=default_model(), help="same as MODEL")
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)  # accepted for uniformity; unused
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.add_argument("--local-dir", default=None, help="write the files to this folder (easy to copy elsewhere) "
                                                     "instead of the Hugging Face cache")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: $HF_HOME/hub)")
    p.set_defaults(run=run)
    return p


def download(model: str, revision: str | None = None, local_dir: str | None = None,
             cache_dir: str | None = None) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, revision=revision, local_dir=local_dir, cache_dir=cache_dir,
                                 allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as exc:  # offline, unknown repo, gated, disk full ...
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set, so nothing may be downloaded. " if offline else ""
        raise CLIError(
            f"could not download {model!r} from the Hugging Face Hub: {type(exc).__name__}: {exc}\n"
            f"{why}This machine may have no network access (or the id is wrong). Run `xgenmm download {model}` "
            f"on a machine with network access, copy the result (the Hugging Face cache, or the folder given to "
            f"--local-dir) here, and pass --model PATH if it is not in this machine's cache."
        ) from None


def run(args: argparse.Namespace) -> int:
    model = args.model_id or args.model
    eprint(f"downloading {model} ...")
    path = download(model, args.revision, args.local_dir, args.cache_dir)
    print(path)
    eprint(f"done. Try:  xgenmm chat --model {args.local_dir or model} --image IMAGE \"Describe this image.\"")
    return 0
