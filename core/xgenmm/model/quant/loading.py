"""Quantize the language model while its checkpoint is read, one decoder layer at a time.

The model is materialised with `to_empty` (pages are committed only when written), the non-quantized tensors are
read first, then each decoder layer's linear weights are read and replaced by their quantized form before the next
layer is read, so the full-precision weights never all exist at once: peak memory is the quantized model plus one
layer (`benchmarks/quantization_cpu.py` measures it). The checkpoint reader is passed in (`load_tensors`), so this
module knows nothing of the file format.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ...errors import QuantizationError
from ..cpu_linear import PackedLinear
from .cache import QuantizedWeightsCache
from .linears import QUANTIZED_LINEARS, Int8StoredLinear, QuantizedLinear
from .memory import release_freed_memory

logger = logging.getLogger("xgenmm.quant")

QUANTIZATION_METHODS = ("int8", "int4", "fp8")
CPU_METHODS = ("int8", "int4", "fp8")
# method -> the lowest CUDA compute capability it runs on: int8 is our Triton kernel (`triton_int8.py`; Triton targets
# 8.0+: Ampere, Ada, Hopper, later), fp8 needs fp8 tensor cores (8.9+: Ada, Hopper). int4 is CPU-only.
CUDA_MIN_CAPABILITY = {"int8": (8, 0), "fp8": (8, 9)}
CUDA_METHODS = tuple(CUDA_MIN_CAPABILITY)
LANGUAGE_MODEL_PREFIX = "vlm.lang_model."  # the official checkpoint's key prefix of the Phi-3 part
HEAD_KEYS = (LANGUAGE_MODEL_PREFIX + "lm_head.weight", LANGUAGE_MODEL_PREFIX + "lm_head.additional_fc.weight")
HEAD_NAME = "lm_head_quantized"
VISION_STORED_INT8 = ("int8", "int4")  # methods that also keep the vision tower + perceiver weights in int8 at rest


def _cuda_requirement(method: str) -> str:
    major, minor = CUDA_MIN_CAPABILITY[method]
    return f"quantization={method!r} (compute capability >= {major}.{minor})"


def check_quantization(method: str | None, device: torch.device | str | None = None,
                       capability: tuple[int, int] | None = None) -> str | None:
    """The method, validated: None, or one of QUANTIZATION_METHODS that `device` runs; else `QuantizationError`
    naming the allowed values. On CUDA the GPU's compute capability decides (`capability`, else asked of `device`)."""
    if method is None:
        return None
    if not isinstance(method, str) or method not in QUANTIZATION_METHODS:
        raise QuantizationError(f"quantization must be None or one of {', '.join(map(repr, QUANTIZATION_METHODS))}; "
                                f"got {method!r}")
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda":
            options = " or ".join(_cuda_requirement(m) for m in CUDA_METHODS)
            if method not in CUDA_METHODS:
                raise QuantizationError(f"quantization={method!r} runs on CPU only; on CUDA use {options}, or None")
            capability = tuple(capability or torch.cuda.get_device_capability(device))
            if capability < CUDA_MIN_CAPABILITY[method]:
                fits = [_cuda_requirement(m) for m in CUDA_METHODS if capability >= CUDA_MIN_CAPABILITY[m]]
                reason = ("fp8 tensor cores" if method == "fp8" else "a GPU that Triton compiles for")
                raise QuantizationError(f"{_cuda_requirement(method)} needs {reason}; this GPU has compute "
                                        f"capability {capability[0]}.{capability[1]}: use "
                                        f"{' or '.join(fits) + ', or ' if fits else ''}quantization=None")
        elif device.type != "cpu":
            raise QuantizationError(f"quantization runs on cpu or cuda, not {device.type}")
    return method


def language_model_linears(net: nn.Module) -> dict[str, str]:
    """Every linear layer of the language model (plain, oneDNN or packed for our CPU kernels): its module name in
    `net` -> its weight's checkpoint key."""
    return {f"language_model.{name}": f"{LANGUAGE_MODEL_PREFIX}model.{name}.weight"
            for name, sub in net.language_model.named_modules() if isinstance(sub, nn.Linear | PackedLinear)}


def vision_linears(net: nn.Module) -> list[str]:
    """Every linear layer of the vision tower and the perceiver (module names in `net`; plain or int8 at rest)."""
    return [f"vision.{name}" for name, sub in net.vision.named_modules()
            if isinstance(sub, nn.Linear | Int8StoredLinear)]


def _store_vision_int8(net: nn.Module) -> list[str]:
    """The (loaded) vision tower's and perceiver's linears replaced by `Int8StoredLinear`: int8 at rest, computed
    in the model dtype as before (docs/quantization.md has the fidelity this costs: within the int8 rows)."""
    names = vision_linears(net)
    for name in names:
        sub = net.get_submodule(name)
        _replace(net, name, Int8StoredLinear.from_weight(sub.weight, sub.bias))
    return names


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, module)


def _by_layer(names: Iterable[str]) -> list[list[str]]:
    """Module names grouped by decoder layer (`language_model.layers.<i>.`), in layer order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        groups.setdefault(".".join(parts[:3]) if parts[1] == "layers" else name, []).append(name)
    return list(groups.values())


def quantize_language_model(net: nn.Module, method: str, group_size: int = 128) -> int:
    """Quantize an already loaded model in place (every language-model linear and the LM head); returns how many
    layers were replaced. Load-time quantization (`load_quantized_into`) does the same while reading."""
    check_quantization(method, net.lm_head_bias.device)
    cls = QUANTIZED_LINEARS[method]
    names = list(language_model_linears(net))
    for name in names:
        sub = net.get_submodule(name)
        _replace(net, name, cls.from_weight(sub.weight, sub.bias, group_size=group_size))
    _quantize_head(net, cls, group_size)
    stored = _store_vision_int8(net) if method in VISION_STORED_INT8 else []
    return len(names) + 1 + len(stored)


def _quantize_head(net: nn.Module, cls: type[QuantizedLinear], group_size: int) -> None:
    """The folded [32015, hidden] head (official rows + the 3 `additional_fc` rows, one scale per row) with its bias;
    the full-precision head is freed."""
    setattr(net, HEAD_NAME, cls.from_weight(net.lm_head_weight, net.lm_head_bias, group_size=group_size))
    net.lm_head_weight = None


def load_quantized_into(net: nn.Module, method: str, load_tensors: Callable[[set[str]], None], keys: Iterable[str],
                        source_files: Iterable[Path] = (), cache_dir: str | Path | None = None,
                        group_size: int = 128) -> None:
    """Fill `net` (materialised, not yet loaded) from its checkpoint with the language model quantized.

    `load_tensors(keys)` reads those checkpoint tensors into `net`; `keys` are all the checkpoint's keys;
    `source_files` (the shards) identify the checkpoint for the cache in `cache_dir`: when it holds this
    checkpoint's weights quantized the same way they are read from there, else they are quantized and saved there."""
    device = net.lm_head_bias.device
    check_quantization(method, device)
    if method == "fp8" and device.type == "cpu":
        logger.warning("quantization='fp8' on CPU runs torch._scaled_mm's CPU kernel, far slower than int8 (it is "
                       "there to test the GPU path's logic); use quantization='int8' on CPU")
    cls = QUANTIZED_LINEARS[method]
    keys = set(keys)
    linears = language_model_linears(net)
    started = time.perf_counter()
    cache = None
    if cache_dir is not None:
        cache = QuantizedWeightsCache.for_checkpoint(cache_dir, method, next(net.vision.parameters()).dtype,
                                                     group_size, source_files)
        if cache.is_complete():
            load_tensors(keys - set(linears.values()) - set(HEAD_KEYS))
            net.lm_head_weight = None
            for name, module in cache.read(device):  # each put in place as read: what it replaces is freed now
                _replace(net, name, module)
                if not name.startswith("language_model.") or name.endswith(".down_proj"):
                    release_freed_memory()  # after the vision layers and each decoder layer
            release_freed_memory()
            logger.info("quantized weights (%s) read from %s in %.1f s", method, cache.path,
                        time.perf_counter() - started)
            return
    load_tensors(keys - set(linears.values()))  # everything but the decoder's linears (the head included)
    _quantize_head(net, cls, group_size)
    stored = _store_vision_int8(net) if method in VISION_STORED_INT8 else []
    release_freed_memory()
    for group in _by_layer(linears):
        load_tensors({linears[name] for name in group})
        for name in group:
            sub = net.get_submodule(name)
            _replace(net, name, cls.from_weight(sub.weight, sub.bias, group_size=group_size))
        release_freed_memory()
    logger.info("language model quantized to %s while loading in %.1f s", method, time.perf_counter() - started)
    if cache is not None:
        # vision first: a later start reads them first and frees the full-precision vision weights early
        cache.write({name: net.get_submodule(name) for name in [*stored, HEAD_NAME, *linears]})
        logger.info("quantized weights saved to %s", cache.path)
