"""The quantized-weights cache (`quantized_cache_dir=`): one folder per (checkpoint, method, model dtype, torch).

A folder holds `weights.safetensors` (every quantized layer's buffers, keyed `<module name>.<buffer>`) and
`quantization.json` (method, format version, each layer's shapes and parameters, and what it was made from: the
checkpoint's shard files with their sizes and modification times, the model dtype, the torch version, since int4's
packing is ATen's). The folder name is a hash of that origin, so a changed checkpoint, method or torch simply misses
and is quantized again; the json is written last (after an atomic rename of the folder), so a folder with a json is
complete. Weights are read straight into the layers' buffers (no memory map, no second copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ...errors import CheckpointError
from .linears import QUANTIZED_LINEARS, STORED_LINEARS, QuantizedLinear
from .memory import release_freed_memory

FORMAT_VERSION = 2  # 2: each layer records its class (`method`); the vision tower's int8-at-rest layers are kept too
WEIGHTS_FILE = "weights.safetensors"
INFO_FILE = "quantization.json"
_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
           "F8_E4M3": torch.float8_e4m3fn}


def _origin(method: str, dtype: torch.dtype, group_size: int, source_files: Iterable[Path]) -> dict:
    files = []
    for path in sorted(Path(p).resolve() for p in source_files):
        stat = path.stat()
        files.append([str(path), stat.st_size, stat.st_mtime_ns])
    return {"format_version": FORMAT_VERSION, "method": method, "model_dtype": str(dtype).removeprefix("torch."),
            "group_size": group_size, "torch": torch.__version__.split("+")[0], "checkpoint_files": files}


class QuantizedWeightsCache:
    def __init__(self, root: Path, origin: dict):
        self.origin = origin
        digest = hashlib.sha256(json.dumps(origin, sort_keys=True).encode()).hexdigest()[:16]
        self.path = root / f"{origin['method']}-{digest}"

    @classmethod
    def for_checkpoint(cls, root: str | Path, method: str, dtype: torch.dtype, group_size: int,
                       source_files: Iterable[Path]) -> QuantizedWeightsCache:
        return cls(Path(root).expanduser(), _origin(method, dtype, group_size, source_files))

    def is_complete(self) -> bool:
        info = self.path / INFO_FILE
        if not (info.is_file() and (self.path / WEIGHTS_FILE).is_file()):
            return False
        try:
            return json.loads(info.read_text()).get("origin") == self.origin
        except (OSError, ValueError):
            return False

    def write(self, modules: dict[str, QuantizedLinear]) -> None:
        """Save every layer's buffers (into a temporary folder renamed into place: never a half-written cache)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.path.parent))
        try:
            _save_streaming(modules, tmp / WEIGHTS_FILE)
            layers = {name: {"method": m.method, "in_features": m.in_features, "out_features": m.out_features,
                             "bias_dtype": None if m.bias is None else str(m.bias.dtype).removeprefix("torch."),
                             **m.params()} for name, m in modules.items()}
            (tmp / INFO_FILE).write_text(json.dumps({"origin": self.origin, "layers": layers}, indent=1))
            if self.path.exists():
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def read(self, device: torch.device) -> Iterator[tuple[str, QuantizedLinear]]:
        """The saved layers in file order, each built empty as its recorded class from the json, filled from the
        safetensors file and yielded as soon as it is read (so the caller can put it in place and free what it
        replaces before the next one is read)."""
        classes = {**QUANTIZED_LINEARS, **STORED_LINEARS}
        layers = json.loads((self.path / INFO_FILE).read_text())["layers"]
        path = self.path / WEIGHTS_FILE
        with open(path, "rb", buffering=0) as fh:
            header = _header(fh, path)
            for name, spec in layers.items():
                bias_dtype = getattr(torch, spec["bias_dtype"]) if spec["bias_dtype"] else None
                params = {k: v for k, v in spec.items()
                          if k not in ("method", "in_features", "out_features", "bias_dtype")}
                cls = classes.get(spec.get("method"))
                if cls is None:
                    raise CheckpointError(f"quantized-weights cache {path} has a layer of unknown kind "
                                          f"{spec.get('method')!r}; delete its folder")
                module = cls.empty(spec["in_features"], spec["out_features"], bias_dtype, device, **params)
                for key, buf in module.state_dict().items():
                    _read_into(fh, path, header, f"{name}.{key}", buf)
                module.finish_loading()  # e.g. int8 packs its weight for our kernel (the file keeps [N, K])
                yield name, module


_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _save_streaming(modules: dict[str, QuantizedLinear], path: Path) -> None:
    """The layers' state dicts as one safetensors file, written a layer at a time: `save_file` needs every tensor at
    once, and a packed int8 layer's state dict is an unpacked copy, so that was a second copy of the whole quantized
    model in memory (+3.6 GB of peak RSS at full size). Pass 1 takes the shapes for the header, pass 2 the bytes."""
    entries, offset = {}, 0
    for name, module in modules.items():
        for key, t in module.state_dict().items():
            nbytes = t.numel() * t.element_size()
            entries[f"{name}.{key}"] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                                        "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    header = json.dumps({"__metadata__": {"format": "xgenmm-quantized"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for name, module in modules.items():
            for t in module.state_dict().values():
                fh.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
            release_freed_memory()


def _header(fh, path: Path) -> dict:
    try:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    except (struct.error, ValueError) as exc:
        raise CheckpointError(f"quantized-weights cache {path} is unreadable ({exc}); delete its folder") from exc
    header.pop("__metadata__", None)
    return {name: (info, 8 + length) for name, info in header.items()}


def _read_into(fh, path: Path, header: dict, key: str, buf: torch.Tensor) -> None:
    if key not in header:
        raise CheckpointError(f"quantized-weights cache {path} has no {key}; delete its folder")
    info, base = header[key]
    begin, end = (base + int(o) for o in info["data_offsets"])
    if _DTYPES.get(info["dtype"]) != buf.dtype or tuple(info["shape"]) != tuple(buf.shape):
        raise CheckpointError(f"{key} in quantized-weights cache {path} is {info['dtype']} {info['shape']}, expected "
                              f"{buf.dtype} {list(buf.shape)}; delete its folder")
    target = buf if buf.device.type == "cpu" else torch.empty(buf.shape, dtype=buf.dtype)
    fh.seek(begin)
    if fh.readinto(target.view(-1).view(torch.uint8).numpy()) != end - begin:
        raise CheckpointError(f"quantized-weights cache {path} ends inside {key}; delete its folder")
    if target is not buf:
        buf.copy_(target)
