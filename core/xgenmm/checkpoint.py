"""Find an xGen-MM checkpoint and load its official-format safetensors into our model.

- A local directory is used as is; anything else is a Hugging Face model id, resolved from the local cache first and
  downloaded only when the machine is online (never `trust_remote_code`, never a separate SigLIP download).
- Shards (`model.safetensors.index.json`) or a single `model.safetensors`, read tensor by tensor (in chunks of at most
  64 MiB, with plain file reads, never a memory map) straight into the model's parameters, which are allocated once in
  the target dtype: peak memory is the weights in that dtype plus one chunk, whatever the checkpoint's own dtype.
- Every expected key must be present with its exact shape; unknown keys are errors; the SigLIP pooling-head keys
  (`vlm.vision_encoder.head.*`) are ignored on purpose (xGen-MM never uses them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .model.config import XGenMMConfig
from .errors import CheckpointError, ModelNotFoundError

logger = logging.getLogger("xgenmm.checkpoint")

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
        return {name: single for name in read_safetensors_header(single)}
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


@dataclass(frozen=True)
class CheckpointLayout:
    """A checkpoint's tensors, checked against the model its config builds: key -> file, key -> shape, headers."""

    files: dict[str, Path]
    expected: dict[str, tuple[int, ...]]
    index: dict[Path, dict[str, TensorEntry]]


def check_checkpoint_layout(model, checkpoint_dir: Path) -> CheckpointLayout:
    """Keys and shapes of the shards' headers against the model built from config.json (on the meta device, so a
    config that disagrees with its weights, e.g. an absurd layer count, fails here before anything is allocated)."""
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
    index = safetensors_index(files)
    for name in sorted(expected):
        path = files[name]
        entry = index[path].get(name)
        if entry is None:
            raise CheckpointError(f"{path.name} does not contain {name} although the index says so")
        if entry.shape != expected[name]:
            raise CheckpointError(f"{name} in {path.name} has shape {list(entry.shape)}, expected "
                                  f"{list(expected[name])} from config.json")
    return CheckpointLayout(files, expected, index)


def load_checkpoint_into(model, checkpoint_dir: Path, device: torch.device, dtype: torch.dtype,
                         layout: CheckpointLayout | None = None) -> None:
    """Copy every official tensor into `model` (already materialised on `device` with `dtype`), checking keys and
    shapes (`layout`: the result of `check_checkpoint_layout` when the caller already ran it)."""
    layout = layout or check_checkpoint_layout(model, checkpoint_dir)
    files, expected, index = layout.files, layout.expected, layout.index
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
        for path, names in _names_by_file(files, sorted(expected)).items():
            with open(path, "rb", buffering=0) as fh:
                for name in names:
                    entry = index[path][name]
                    if name in folded:
                        param, rows, truncate = folded[name]
                        dest = param.data[rows]
                        rows_read = dest.shape[0] if truncate else entry.shape[0]
                    else:
                        dest, rows_read = targets[name].data, entry.shape[0] if entry.shape else 0
                    _read_rows_into(fh, path, name, entry, dest, rows_read)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_CHUNK_BYTES = 64 * 1024**2


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header (8-byte little-endian length, then JSON): name -> dtype, shape, byte range."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 1024**2:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(fh.read(length))
        size = path.stat().st_size
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = (8 + length + int(o) for o in info["data_offsets"])
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            if end > size or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name} has inconsistent offsets")
            entries[name] = TensorEntry(dtype, shape, begin, end)
        return entries
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise CheckpointError(f"cannot read {path.name}: {exc} (corrupt or truncated safetensors file?)") from exc


def safetensors_index(files: dict[str, Path]) -> dict[Path, dict[str, TensorEntry]]:
    """Every shard's header (of `checkpoint_files`' key -> shard map), parsed once."""
    return {path: read_safetensors_header(path) for path in sorted(set(files.values()))}


def _names_by_file(files: dict[str, Path], names: list[str]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for keys in by_file.values():
        keys.sort()
    return by_file


def _read_rows_into(fh, path: Path, name: str, entry: TensorEntry, dest: torch.Tensor, rows: int) -> None:
    """Copy the first `rows` rows of a tensor from the open file into `dest` (any dtype / device), converting in
    chunks of at most 64 MiB: a same-dtype CPU destination is read into directly, anything else through one buffer."""
    if not entry.shape:  # a scalar
        rows, row_shape = 1, ()
    else:
        row_shape = entry.shape[1:]
    row_bytes = math.prod(row_shape) * entry.dtype.itemsize
    direct = dest.device.type == "cpu" and dest.dtype == entry.dtype and dest.is_contiguous()
    step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    flat_dest = dest.reshape(rows, *row_shape) if entry.shape else dest.reshape(1)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        nbytes = (r1 - r0) * row_bytes
        if direct:
            buf = flat_dest[r0:r1]
        else:
            buf = torch.empty((r1 - r0, *row_shape) if entry.shape else (1,), dtype=entry.dtype)
        view = buf.view(-1).view(torch.uint8).numpy()
        fh.seek(entry.start + r0 * row_bytes)
        if fh.readinto(view) != nbytes:
            raise CheckpointError(f"{path.name} ends inside tensor {name} (truncated file?)")
        if not direct:
            flat_dest[r0:r1].copy_(buf.reshape(flat_dest[r0:r1].shape))


def cpu_computes_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AMX tiles or AVX-512 BF16) and oneDNN can use it, as torch
    reports it. There bf16 matmuls run ~4x faster than float32 (benchmarks/cpu_linear.py); elsewhere they are
    emulated and far slower, so the automatic CPU dtype stays float32."""
    cpu = torch.cpu
    native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return native and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def parse_dtype(dtype: str | torch.dtype | None, config: XGenMMConfig, device: torch.device) -> torch.dtype:
    """The model dtype. None / "auto": bfloat16 on CUDA, and on CPUs that compute bf16 natively
    (`cpu_computes_bf16`), float32 on other CPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.bfloat16 if cpu_computes_bf16() else torch.float32
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
    quantization: str | None = None,
    quantized_cache_dir: str | os.PathLike | None = None,
):
    """Build `XGenMMForConditionalGeneration` from a checkpoint directory (or HF id) alone and load its weights.

    The model is built on the meta device, cast there, then allocated once in the target dtype; weights are read
    into it tensor by tensor (`load_checkpoint_into`), so a float32 checkpoint loaded in bf16 never holds a float32
    copy. `linear_kernel`: "auto" runs linear layers on oneDNN on CPU (float32 and bf16, plus our bf16 kernel for
    decode-sized batches; `model/cpu_linear.py`) and ATen elsewhere; "torch" always uses ATen's `F.linear` (what
    upstream's transformers code runs). `quantization` (None, "int8", "int4", "fp8"): the language model's linears
    and LM head quantized while loading, kept in `quantized_cache_dir` when given (`model/quant/`)."""
    from .model.cpu_linear import onednn_linear_available
    from .model.quant import check_quantization, load_quantized_into
    from .model.xgenmm import XGenMMForConditionalGeneration

    if linear_kernel not in ("auto", "torch"):
        raise ValueError(f"linear_kernel must be 'auto' or 'torch', got {linear_kernel!r}")
    check_quantization(quantization, device)

    checkpoint_dir = resolve_model_dir(model)
    config = XGenMMConfig.from_pretrained(checkpoint_dir)
    device = torch.device(device)
    torch_dtype = parse_dtype(dtype, config, device)
    if dtype in (None, "auto"):
        logger.info("dtype auto on %s: %s%s", device.type, str(torch_dtype).removeprefix("torch."),
                    " (the CPU computes bf16 natively)" if device.type == "cpu" and torch_dtype == torch.bfloat16 else "")
    with torch.device("meta"):
        net = XGenMMForConditionalGeneration(config, vision_attn_implementation)
    layout = check_checkpoint_layout(net, checkpoint_dir)  # before any allocation: config sizes vs shard headers
    net = net.to(torch_dtype).to_empty(device=device)  # the cast is free on meta: parameters exist once, in the target dtype
    net.reset_buffers()
    if quantization is None:
        load_checkpoint_into(net, checkpoint_dir, device, torch_dtype, layout)
    else:
        def load_tensors(keys: set[str]) -> None:
            subset = CheckpointLayout(layout.files, {k: layout.expected[k] for k in keys}, layout.index)
            load_checkpoint_into(net, checkpoint_dir, device, torch_dtype, subset)

        load_quantized_into(net, quantization, load_tensors, layout.expected, source_files=set(layout.files.values()),
                            cache_dir=quantized_cache_dir)
    net.eval().requires_grad_(False)
    if linear_kernel == "auto" and onednn_linear_available(device, torch_dtype):
        net.use_onednn_linears()
    net.checkpoint_dir = checkpoint_dir
    return net
