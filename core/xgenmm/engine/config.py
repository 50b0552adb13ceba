"""`EngineConfig`: the engine's options (KV block size, batch budgets, caches, kernels), with defaults sized per device.

The model's own configuration (widths, layers, vocabulary) is `xgenmm.model.config.XGenMMConfig`, read from the
checkpoint's config.json; this is how the engine runs that model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["EngineConfig", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 16  # tokens per KV-cache block (and per prefix-cache hash)


@dataclass
class EngineConfig:
    """Engine-core options (all have defaults sized for the device). How requests are read (image policy, image
    decodes at once, chat content tokens) is the client's: `xgenmm.client.ClientSettings`."""

    max_num_seqs: int | None = None  # default: 256 on CUDA, 64 on CPU
    max_num_batched_tokens: int | None = None  # default: 8192 on CUDA, 2048 on CPU
    block_size: int = DEFAULT_BLOCK_SIZE
    # CPU: bytes for the KV cache (default: room for 16k tokens, 512 MiB to 4 GiB, at most 1/4 of the free memory)
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the GPU the engine may fill
    enable_prefix_caching: bool = True
    vision_cache_bytes: int = 512 * 1024**2
    attention_backend: str | None = None  # "torch" | "flex" | "triton" | None (auto)
    max_model_len: int | None = None  # default: the model's max_position_embeddings (4096)
    seed: int = 0  # process generator for unseeded sampling
    max_images_per_prompt: int = 32
    linear_kernel: str = "auto"  # "auto": oneDNN linears for float32 on CPU (model/cpu_linear.py); "torch": ATen
    # weight-only quantization of the language model at load time: None | "int8" | "int4" | "fp8" (model/quant/);
    # quantized_cache_dir keeps the quantized weights so the next start reads them instead of quantizing again
    quantization: str | None = None
    quantized_cache_dir: str | None = None
    enforce_eager: bool = False  # CUDA: never capture / replay decode CUDA graphs (debugging, profiling)
    prefetch_images: bool | None = None  # encode waiting requests' images ahead on a side stream (None: on CUDA)
    prefetch_image_patches: int = 64  # at most this many image patches encoding ahead at once

    def __post_init__(self) -> None:
        """Every option checked once, here, naming the option: a bad value never surfaces later as a torch or
        allocator error deep inside the engine."""
        for name, minimum in (("max_num_seqs", 1), ("max_num_batched_tokens", 1), ("kv_cache_memory_bytes", 1),
                              ("max_model_len", 1)):
            _check_int(name, getattr(self, name), minimum, optional=True)
        for name, minimum in (("block_size", 1), ("vision_cache_bytes", 0), ("max_images_per_prompt", 0),
                              ("prefetch_image_patches", 1), ("seed", None)):
            _check_int(name, getattr(self, name), minimum)
        fraction = self.gpu_memory_utilization
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"engine option gpu_memory_utilization must be a number in (0, 1], got {fraction!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"engine option attention_backend must be one of "
                              f"{', '.join(map(repr, ATTENTION_BACKENDS))}, got {self.attention_backend!r}")
        if self.linear_kernel not in ("auto", "torch"):
            raise ConfigError(f"engine option linear_kernel must be 'auto' or 'torch', got {self.linear_kernel!r}")
        for name in ("enable_prefix_caching", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"engine option {name} must be a bool, got {getattr(self, name)!r}")
        if self.prefetch_images is not None and not isinstance(self.prefetch_images, bool):
            raise ConfigError(f"engine option prefetch_images must be None or a bool, got {self.prefetch_images!r}")

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)


ATTENTION_BACKENDS = (None, "torch", "cpu_paged", "flex", "triton")


def _check_int(name: str, value: Any, minimum: int | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        need = "an int" if minimum is None else f"an int >= {minimum}"
        raise ConfigError(f"engine option {name} must be {need}{' or None' if optional else ''}, got {value!r}")
