"""CPU attention backend that reads the paged KV cache in place: `torch.ops.xgenmm_cpu.paged_attention`.

Why: the reference backend copies every sequence's KV blocks into a contiguous buffer before SDPA, about a fifth
of a decode step on CPU (memory-bound: the copy reads and writes the context once more than attention needs). This
backend runs one C++ call per layer for the whole flat batch (decodes, chunked-prefill chunks and prompts together),
each query reading its keys and values straight from their blocks (`cpu_kernels/csrc/paged_attention.cpp`, which
also stores the step's new keys and values in one call). float32
and bfloat16; built ahead of time or once per machine (`xgenmm.cpu_kernels`), so no process pays a compile. Batches
it cannot take (another dtype, a head size that is not a multiple of 16, non-CPU tensors) go to the reference.
"""

from __future__ import annotations

import torch

from ..errors import AttentionBackendUnavailableError
from .base import AttentionMetadata, KVCache
from .torch_ref import TorchReferenceBackend


class CpuPagedAttentionBackend:
    name = "cpu_paged"

    def __init__(self) -> None:
        from .. import cpu_kernels

        if not cpu_kernels.available():
            raise AttentionBackendUnavailableError(f"the CPU paged-attention kernel is unavailable: "
                                                   f"{cpu_kernels.unavailable_reason()}; use attention_backend=None (auto) or 'torch'")
        self._op = torch.ops.xgenmm_cpu.paged_attention
        self._store = torch.ops.xgenmm_cpu.store_kv
        self._fallback = TorchReferenceBackend()

    @staticmethod
    def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.dtype == k_cache.dtype
                and q.shape[-1] % 16 == 0 and q.shape[-1] <= 128 and (q.shape[-1] // 16) in (1, 2, 4, 6, 8))

    def forward(self, q, k, v, kv_cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        if not self.supports(q, k_cache):
            return self._fallback.forward(q, k, v, kv_cache, meta, scale)
        self._store(k, v, k_cache, v_cache, meta.slot_mapping)  # k, v: the step's new tokens, in place
        q = q if q.stride(-1) == 1 else q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype)
        self._op(out, q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
                 meta.sliding_window or 0)
        return out
