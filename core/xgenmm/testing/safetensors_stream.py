"""Write a .safetensors file one tensor at a time (bounded memory: the full 4.4 B-parameter model never sits in RAM).

The header (names, dtypes, shapes, offsets) is known up front from the tensor specs, so it is written first and each
tensor's bytes are appended as soon as it is generated. The result is a standard safetensors file.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors_streaming(
    path: str | Path,
    entries: Sequence[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write `entries` (name, shape) to `path`, calling `produce(name)` for each tensor in order.

    Every produced tensor must have the declared shape and `dtype`. Returns the number of data bytes written.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape in entries:
        n = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape in entries:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, declared {tuple(shape)} {dtype}")
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(raw.numpy()))
    return offset
