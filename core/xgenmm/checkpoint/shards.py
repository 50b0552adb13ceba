"""Read official-format safetensors without a memory map: parse each shard's header once (name -> dtype, shape, byte
range), map tensor names to shards (from `model.safetensors.index.json` or a single `model.safetensors`, refusing
index entries that point outside the checkpoint folder), and copy rows of a tensor into any destination in chunks of
at most 64 MiB, so peak memory is the destination plus one chunk whatever the checkpoint's own dtype."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

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


def names_by_file(files: dict[str, Path], names: list[str]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for keys in by_file.values():
        keys.sort()
    return by_file


def read_rows_into(fh, path: Path, name: str, entry: TensorEntry, dest: torch.Tensor, rows: int) -> None:
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
