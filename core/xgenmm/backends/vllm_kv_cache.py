"""The vLLM backend's CPU KV cache default, sized from the model as the native engine's pool is.

vLLM on CPU takes its KV cache size from `VLLM_CPU_KVCACHE_SPACE` or `kv_cache_memory_bytes`, and refuses to start
when it cannot hold one request of the model's full context ("To serve at least one request with the model's max seq
len (4096), 1.5 GiB KV cache is needed"). A fixed 1 GiB was enough for the tiny test models and too small for the
full-size one. This default is the native engine's (`default_cpu_kv_cache_bytes`: room for 16k tokens within memory
bounds) and never less than one full-context sequence. Pure arithmetic on the config: no vLLM, no weights.
"""

from __future__ import annotations

import torch

from ..attention.base import kv_cache_bytes_per_block
from ..engine.model_runner import default_cpu_kv_cache_bytes
from ..model.config import XGenMMConfig

__all__ = ["vllm_cpu_kv_cache_bytes", "VLLM_BLOCK_SIZE"]

VLLM_BLOCK_SIZE = 16  # vLLM's default KV block (page) size in tokens; the full context is rounded up to it
_MIB = 1024**2


def vllm_cpu_kv_cache_bytes(config: XGenMMConfig, dtype: torch.dtype, max_model_len: int | None = None) -> int:
    """KV cache bytes for vLLM on CPU: the native default for this model, at least one sequence of `max_model_len`
    tokens (default: the model's `max_position_embeddings`, as vLLM takes it) plus one block, rounded up to a MiB."""
    text = config.text
    per_token = kv_cache_bytes_per_block(text.num_hidden_layers, 1, text.num_key_value_heads, text.head_dim, dtype)
    context = int(max_model_len or text.max_position_embeddings)
    blocks = -(-context // VLLM_BLOCK_SIZE) + 1
    full_context = blocks * VLLM_BLOCK_SIZE * per_token
    wanted = max(default_cpu_kv_cache_bytes(per_token), full_context)
    return -(-wanted // _MIB) * _MIB
