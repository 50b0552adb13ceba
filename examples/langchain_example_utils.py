"""Shared bits of the LangChain examples: argument defaults and the offline random checkpoint."""

from __future__ import annotations

import atexit
import base64
import mimetypes
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMAGES = Path(__file__).parent / "images"


def add_model_args(parser) -> None:
    parser.add_argument("--model", help="HF id or local checkpoint (default: a tiny random checkpoint, offline)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)


def model_kwargs(args) -> dict:
    """ChatXGenMM's model/device/dtype: the given model, or a tiny random one on CPU in float32."""
    if args.model:
        return {"model": args.model, "device": args.device, "dtype": args.dtype}
    from xgenmm.testing import make_random_checkpoint

    root = Path(tempfile.mkdtemp(prefix="xgenmm-random-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    print(f"[no --model: using a tiny RANDOM checkpoint in {root}; expect gibberish text]")
    path = make_random_checkpoint(root / "tiny", preset="tiny", seed=0)
    return {"model": str(path), "device": args.device or "cpu", "dtype": args.dtype or "float32"}


def image_block(path: Path) -> dict:
    """A standard LangChain image block with the file inline (base64)."""
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return {"type": "image", "base64": base64.b64encode(path.read_bytes()).decode("ascii"), "mime_type": mime}
