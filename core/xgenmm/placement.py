"""Where a model runs and in which dtype: resolved and validated once, for every front end and both engine cores.

`resolve_placement(device, dtype)` turns what a user typed (`--device cuda`, `device="cpu"`, `dtype="bf16"`, None)
into a `Placement` of a concrete `torch.device` and `torch.dtype`, or raises a typed error that says what to do
instead (`DeviceError`, `DtypeError`; both `ConfigError`s), before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .cpu_features import cpu_computes_bf16
from .errors import DeviceError, DtypeError

DEVICE_FORMS = ('"cpu"', '"cuda"', '"cuda:N"', "None (cuda if available, else cpu)")
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
ALLOWED_DTYPES = ("auto", "float32", "bfloat16", "float16")  # the canonical names; DTYPE_NAMES' aliases also work


@dataclass(frozen=True)
class Placement:
    """A resolved, validated device and model dtype."""

    device: torch.device
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.device} / {str(self.dtype).removeprefix('torch.')}"


def _torch_build() -> str:
    return f"torch {torch.__version__}"


def _check_cuda(device: torch.device, asked: Any) -> torch.device:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise DeviceError(f"device={asked!r} but this torch build has no CUDA ({_torch_build()}); "
                          f'use device="cpu" or install a CUDA build of torch')
    if not torch.cuda.is_available():
        raise DeviceError(f"device={asked!r} but no CUDA GPU is visible to {_torch_build()} "
                          f"(torch.cuda.is_available() is False: check the driver and CUDA_VISIBLE_DEVICES); "
                          f'use device="cpu"')
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < count:
        raise DeviceError(f"device={asked!r} but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
                          f"pick one of those")
    return torch.device("cuda", index)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """A concrete device: None -> the current CUDA device if one is usable, else cpu; "cuda" gets its index filled
    in. A device this build or machine cannot use, or an unknown name, raises `DeviceError` with the remedy."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        try:
            parsed = torch.device(device.strip().lower())
        except (RuntimeError, ValueError):
            raise DeviceError(f"unknown device {device!r}; use one of {', '.join(DEVICE_FORMS)}") from None
    else:
        raise DeviceError(f"device must be a string or torch.device, got {type(device).__name__}; "
                          f"use one of {', '.join(DEVICE_FORMS)}")
    if parsed.type == "cpu":
        return torch.device("cpu")
    if parsed.type == "cuda":
        return _check_cuda(parsed, device if isinstance(device, str) else str(device))
    raise DeviceError(f"device {str(parsed)!r} is not supported: xgenmm runs on cpu or cuda; "
                      f"use one of {', '.join(DEVICE_FORMS)}")


def resolve_dtype(dtype: str | torch.dtype | None, config: Any = None,
                  device: str | torch.device | None = None) -> torch.dtype:
    """The model dtype. None / "auto": bfloat16 on CUDA and on CPUs that compute bf16 natively (`cpu_features`),
    float32 on other CPUs. Otherwise float32, bfloat16 or float16 (or an alias: fp32, bf16, fp16, half, ...);
    anything else raises `DtypeError` naming the allowed values. `config` (an `XGenMMConfig`) is accepted so a
    checkpoint-specific rule has one place to live; the official checkpoints run in every allowed dtype."""
    del config
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise DtypeError(f"dtype {dtype} is not supported; use one of {', '.join(ALLOWED_DTYPES)}")
        return dtype
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        place = device if isinstance(device, torch.device) else resolve_device(device)
        if place.type == "cpu":
            return torch.bfloat16 if cpu_computes_bf16() else torch.float32
        return torch.bfloat16
    if not isinstance(dtype, str):
        raise DtypeError(f"dtype must be a string or torch.dtype, got {type(dtype).__name__}; "
                         f"use one of {', '.join(ALLOWED_DTYPES)}")
    name = dtype.strip().lower().removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise DtypeError(f"unknown dtype {dtype!r}; use one of {', '.join(ALLOWED_DTYPES)} "
                         f"(aliases: {', '.join(n for n in DTYPE_NAMES if n not in ALLOWED_DTYPES)})")
    return DTYPE_NAMES[name]


def resolve_placement(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                      config: Any = None) -> Placement:
    """Device first (so "auto" knows where it runs), then dtype; both validated, with typed errors."""
    resolved = resolve_device(device)
    return Placement(resolved, resolve_dtype(dtype, config, resolved))


__all__ = ["ALLOWED_DTYPES", "DTYPE_NAMES", "Placement", "resolve_device", "resolve_dtype", "resolve_placement"]
