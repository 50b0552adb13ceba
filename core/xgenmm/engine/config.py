"""`EngineConfig`: the engine's options (KV block size, batch budgets, caches, kernels), with defaults sized per device.

The model's own configuration (widths, layers, vocabulary) is `xgenmm.model.config.XGenMMConfig`, read from the
checkpoint's config.json; this is how the engine runs that model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..multimodal.image_sources import ImageInputPolicy

__all__ = ["EngineConfig", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 16  # tokens per KV-cache block (and per prefix-cache hash)


@dataclass
class EngineConfig:
    """Engine options (all have defaults sized for the device)."""

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
    image_policy: ImageInputPolicy = field(default_factory=ImageInputPolicy)
    seed: int = 0  # process generator for unseeded sampling
    max_images_per_prompt: int = 32
    max_concurrent_image_decodes: int = 2  # image pixels decoded at once per engine (bounds decode memory)
    # Control tokens inside chat message content: "text" (plain text, nobody can forge a turn) or "special" (parsed,
    # as upstream's tokenization of the whole string does). See xgenmm.chat.template.
    chat_content_tokens: str = "text"
    linear_kernel: str = "auto"  # "auto": oneDNN linears for float32 on CPU (model/cpu_linear.py); "torch": ATen
    # weight-only quantization of the language model at load time: None | "int8" | "int4" | "fp8" (model/quant/);
    # quantized_cache_dir keeps the quantized weights so the next start reads them instead of quantizing again
    quantization: str | None = None
    quantized_cache_dir: str | None = None
    enforce_eager: bool = False  # CUDA: never capture / replay decode CUDA graphs (debugging, profiling)
    prefetch_images: bool | None = None  # encode waiting requests' images ahead on a side stream (None: on CUDA)
    prefetch_image_patches: int = 64  # at most this many image patches encoding ahead at once

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)
