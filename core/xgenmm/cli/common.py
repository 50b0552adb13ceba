"""Options shared by the `xgenmm` commands, and the one place that turns "no weights here" into advice."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..checkpoint.hub import DEFAULT_MODEL_ID
from ..errors import ModelNotFoundError, XGenMMError
from ..model.quant.loading import QUANTIZATION_METHODS
from ..multimodal.image_sources import ImageInputPolicy

MODEL_ENV = "XGENMM_MODEL"


class CLIError(XGenMMError):
    """A problem the user can fix; printed as one line `xgenmm <command>: error: ...` with exit status 1 (as every
    other `XGenMMError` is)."""


def default_model() -> str:
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL_ID


def add_model_args(parser: argparse.ArgumentParser, model_default: str | None = "") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", default=default_model() if model_default == "" else model_default,
                       help=f"Hugging Face id or local checkpoint directory "
                            f"(default: ${MODEL_ENV} or {DEFAULT_MODEL_ID})")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    group.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (default auto: bfloat16 "
                                                     "on GPU and on CPUs that compute bf16 natively (AMX / AVX-512 "
                                                     "BF16), float32 on other CPUs)")


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(text: str) -> int:
    """'512MiB', '2GiB', '1.5G', '1000000' -> bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512MiB, 2GiB, 4000000000)")
    unit = (match.group(2) or "").lower().rstrip("b")
    return int(float(match.group(1)) * _UNITS[unit])


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, 4096)")
    group.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one batch")
    group.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one engine step")
    group.add_argument("--kv-cache-memory", type=parse_size, default=None, metavar="SIZE",
                       help="KV cache size on CPU, e.g. 2GiB (default 1GiB)")
    group.add_argument("--gpu-memory-utilization", type=float, default=None,
                       help="fraction of GPU memory the engine may use (default 0.9)")
    group.add_argument("--attention-backend", choices=("torch", "cpu_paged", "flex", "triton"), default=None,
                       help="default: the fastest available")
    group.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    group.add_argument("--quantization", choices=QUANTIZATION_METHODS, default=None,
                       help="weight-only quantization of the language model at load time (default: none; int8 on CPU "
                            "and on GPUs >= sm_80, int4 on CPU, fp8 on GPUs >= sm_89; docs/quantization.md)")
    group.add_argument("--quantized-cache-dir", default=None, metavar="DIR",
                       help="keep the quantized weights here so the next start reads them instead of quantizing")
    group.add_argument("--allow-control-tokens-in-content", action="store_true",
                       help="parse role / control tokens written inside chat message content as control tokens, as "
                            "upstream's tokenization does (default: they are plain text, so no one can forge a turn)")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization",
                 "attention_backend", "quantization", "quantized_cache_dir"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    if getattr(args, "kv_cache_memory", None) is not None:
        options["kv_cache_memory_bytes"] = args.kv_cache_memory
    if getattr(args, "no_prefix_caching", False):
        options["enable_prefix_caching"] = False
    if getattr(args, "allow_control_tokens_in_content", False):
        options["chat_content_tokens"] = "special"
    return options


def no_weights_advice(model: str) -> str:
    return (f"no weights for {model!r} are reachable from this machine: run `xgenmm download {model}` on a machine "
            f"with network access and copy the Hugging Face cache (or the folder given to --local-dir) here, or pass "
            f"--model PATH of a local checkpoint directory, or try xgenmm without real weights: "
            f"`xgenmm make-random-checkpoint ./xgenmm-tiny && xgenmm chat --model ./xgenmm-tiny ...`")


def resolve_model(model: str) -> Path:
    """The checkpoint directory for `model`: a local path that is not there says so (`ModelNotFoundError`); a Hugging
    Face id that is not cached and cannot be downloaded is a `CLIError` that says exactly what to run."""
    from ..checkpoint.hub import is_local_path, resolve_model_dir

    try:
        return resolve_model_dir(model)
    except ModelNotFoundError as exc:
        if is_local_path(model) or str(model).count("/") != 1:  # not a Hugging Face id: nothing to download
            raise
        raise CLIError(f"{no_weights_advice(model)} (details: {exc})") from None


def local_image_policy(paths: list[str | Path] | None = None,
                       roots: list[str | Path] | None = None) -> ImageInputPolicy:
    """Images named on the command line are the user's own files: local reads allowed (inside `roots` when given),
    no byte limit (the pixel limit still guards against decompression bombs); never remote URLs."""
    folders = [str(Path(r).resolve()) for r in (roots or [])]
    folders += [str(Path(p).resolve().parent) for p in (paths or [])]
    policy = ImageInputPolicy(allow_local_files=True, local_file_roots=tuple(dict.fromkeys(folders)),
                              max_image_bytes=None)
    return policy.with_hints({"allow_remote_images": "the command line reads local files only: download the image "
                                                     "and pass its path"})


def check_image_files(paths: list[str]) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise CLIError(f"image file not found: {p}")
        out.append(path)
    return out


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
