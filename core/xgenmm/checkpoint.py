"""Find an xGen-MM checkpoint and load its official-format safetensors into our model.

- A local directory is used as is; anything else is a Hugging Face model id, resolved from the local cache first and
  downloaded only when the machine is online (never `trust_remote_code`, never a separate SigLIP download).
- Shards (`model.safetensors.index.json`) or a single `model.safetensors`, memory-mapped, cast tensor by tensor to the
  requested dtype and device.
- Every expected key must be present with its exact shape; unknown keys are errors; the SigLIP pooling-head keys
  (`vlm.vision_encoder.head.*`) are ignored on purpose (xGen-MM never uses them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .model.config import XGenMMConfig
from .errors import CheckpointError, ModelNotFoundError

DEFAULT_MODEL_ID = "Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5"
KNOWN_MODEL_IDS = (
    DEFAULT_MODEL_ID,
    "Salesforce/xgen-mm-phi3-mini-instruct-singleimg-r-v1.5",
    "Salesforce/xgen-mm-phi3-mini-instruct-dpo-r-v1.5",
    "Salesforce/xgen-mm-phi3-mini-base-r-v1.5",
)
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
IGNORED_PREFIXES = ("vlm.vision_encoder.head.",)
_V, _T, _L = "vlm.vision_encoder.", "vlm.vision_tokenizer.", "vlm.lang_model."


def resolve_model_dir(model: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local checkpoint directory for `model` (a path, or a Hugging Face id resolved through huggingface_hub)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not an xGen-MM checkpoint directory")
        return path
    text = str(model)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelNotFoundError(f"model {text!r} is neither an existing directory nor a Hugging Face id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=_DOWNLOAD_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as exc:
        raise ModelNotFoundError(
            f"model {text!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}: {exc}). On a machine with network access run `xgenmm download {text}` "
            f"(or `huggingface-cli download {text}`), or pass the path of a local checkpoint directory."
        ) from exc


def checkpoint_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it (from the index, or a single file)."""
    index = checkpoint_dir / "model.safetensors.index.json"
    single = checkpoint_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files, got "
                                  f"{type(weight_map).__name__}")
        return {name: _shard_path(checkpoint_dir, index, name, shard) for name, shard in weight_map.items()}
    if single.is_file():
        from safetensors import safe_open

        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {checkpoint_dir}")


def _shard_path(checkpoint_dir: Path, index: Path, name: Any, shard: Any) -> Path:
    """The shard file of one index entry: a relative file name that resolves inside the checkpoint folder (an index
    may not point at ../../elsewhere or /absolute/paths)."""
    if not isinstance(name, str) or not isinstance(shard, str) or not shard or "\x00" in shard:
        raise CheckpointError(f"{index}: invalid weight_map entry {name!r}: {shard!r}")
    # Checked on the name, not on where a symlink leads: the Hugging Face cache links every shard to a blob outside
    # the snapshot folder, and that is fine; an index naming ../../elsewhere or /absolute/paths is not.
    relative = os.path.normpath(shard)
    if os.path.isabs(shard) or relative == ".." or relative.startswith(".." + os.sep) or os.path.isabs(relative):
        raise CheckpointError(f"{index}: the shard {shard!r} of {name} is outside the checkpoint folder")
    shard_path = checkpoint_dir / relative
    if not shard_path.is_file():
        raise CheckpointError(f"missing shard {shard} (needed for {name}) in {checkpoint_dir}")
    return shard_path


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read {path.name}: {exc} (corrupt or truncated safetensors file?)") from exc


def iter_checkpoint_tensors(checkpoint_dir: Path, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) shard by shard; tensors are memory-mapped views until copied."""
    files = checkpoint_files(checkpoint_dir)
    by_file: dict[Path, list[str]] = {}
    for name in names if names is not None else files:
        by_file.setdefault(files[name], []).append(name)
    for path, keys in by_file.items():
        with _open(path) as f:
            present = set(f.keys())
            for name in keys:
                if name not in present:
                    raise CheckpointError(f"{path.name} does not contain {name} although the index says so")
                try:
                    yield name, f.get_tensor(name)
                except Exception as exc:
                    raise CheckpointError(f"cannot read tensor {name} from {path.name}: {exc}") from exc


def expected_checkpoint_shapes(model) -> dict[str, tuple[int, ...]]:
    """The official key -> shape table for a model built from a config."""
    cfg = model.config.text
    shapes: dict[str, tuple[int, ...]] = {}
    for name, p in model.vision.vision_encoder.state_dict().items():
        shapes[_V + name] = tuple(p.shape)
    for name, p in model.vision.vision_tokenizer.state_dict().items():
        shapes[_T + name] = tuple(p.shape)
    for name, p in model.language_model.state_dict().items():
        shapes[_L + "model." + name] = tuple(p.shape)
    h, extra = cfg.hidden_size, cfg.num_additional_tokens
    shapes[_L + "model.embed_tokens.weight"] = (cfg.vocab_size, h)
    shapes[_L + "model.embed_tokens.additional_embedding.weight"] = (extra, h)
    shapes[_L + "lm_head.weight"] = (cfg.vocab_size, h)
    shapes[_L + "lm_head.bias"] = (cfg.vocab_size,)
    shapes[_L + "lm_head.additional_fc.weight"] = (extra, h)
    shapes[_L + "lm_head.additional_fc.bias"] = (extra,)
    return shapes


def load_checkpoint_into(model, checkpoint_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Copy every official tensor into `model` (already materialised on `device` with `dtype`), checking keys and shapes."""
    files = checkpoint_files(checkpoint_dir)
    expected = expected_checkpoint_shapes(model)
    present = {k for k in files if not k.startswith(IGNORED_PREFIXES)}
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {checkpoint_dir} is missing {', '.join(missing[:5])}{more}")
    unexpected = sorted(present - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"checkpoint {checkpoint_dir} has unexpected keys {', '.join(unexpected[:5])}{more}")
    cut = model.config.text.initial_tokenizer_len
    targets = {
        **{_V + n: p for n, p in model.vision.vision_encoder.state_dict(keep_vars=True).items()},
        **{_T + n: p for n, p in model.vision.vision_tokenizer.state_dict(keep_vars=True).items()},
        **{_L + "model." + n: p for n, p in model.language_model.state_dict(keep_vars=True).items()},
    }
    folded = {
        _L + "model.embed_tokens.weight": (model.embed_weight, slice(0, cut), True),
        _L + "model.embed_tokens.additional_embedding.weight": (model.embed_weight, slice(cut, None), False),
        _L + "lm_head.weight": (model.lm_head_weight, slice(0, cut), True),
        _L + "lm_head.additional_fc.weight": (model.lm_head_weight, slice(cut, None), False),
        _L + "lm_head.bias": (model.lm_head_bias, slice(0, cut), True),
        _L + "lm_head.additional_fc.bias": (model.lm_head_bias, slice(cut, None), False),
    }
    with torch.no_grad():
        for name, tensor in iter_checkpoint_tensors(checkpoint_dir, sorted(expected)):
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(f"{name} has shape {list(tensor.shape)}, expected {list(expected[name])} from config.json")
            if name in folded:
                param, rows, truncate = folded[name]
                src = tensor[: rows.stop] if truncate else tensor
                param.data[rows].copy_(src.to(device=device, dtype=dtype))
            else:
                target = targets[name]
                target.data.copy_(tensor.to(device=device, dtype=target.dtype if not target.is_floating_point() else dtype))


def parse_dtype(dtype: str | torch.dtype | None, config: XGenMMConfig, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32  # bf16 matmuls are ~200x slower on common CPUs
        return torch.bfloat16
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    return names[dtype]


def load_model(
    model: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    vision_attn_implementation: str = "sdpa",
    linear_kernel: str = "auto",
):
    """Build `XGenMMForConditionalGeneration` from a checkpoint directory (or HF id) alone and load its weights.

    `linear_kernel`: "auto" runs linear layers on oneDNN for float32 on CPU (`model/cpu_linear.py`) and ATen
    elsewhere; "torch" always uses ATen's `F.linear` (what upstream's transformers code runs)."""
    from .model.cpu_linear import onednn_linear_available
    from .model.xgenmm import XGenMMForConditionalGeneration

    if linear_kernel not in ("auto", "torch"):
        raise ValueError(f"linear_kernel must be 'auto' or 'torch', got {linear_kernel!r}")

    checkpoint_dir = resolve_model_dir(model)
    config = XGenMMConfig.from_pretrained(checkpoint_dir)
    device = torch.device(device)
    torch_dtype = parse_dtype(dtype, config, device)
    with torch.device("meta"):
        net = XGenMMForConditionalGeneration(config, vision_attn_implementation)
    net = net.to_empty(device=device).to(torch_dtype)
    net.reset_buffers()
    load_checkpoint_into(net, checkpoint_dir, device, torch_dtype)
    net.eval().requires_grad_(False)
    if linear_kernel == "auto" and onednn_linear_available(device, torch_dtype):
        net.use_onednn_linears()
    net.checkpoint_dir = checkpoint_dir
    return net
