"""CPU attention backend that reads the paged KV cache in place: `paged_attention` of our C++ kernels.

Why: the reference backend copies every sequence's KV blocks into a contiguous buffer before SDPA, about a fifth
of a decode step on CPU (memory-bound: the copy reads and writes the context once more than attention needs; at
full size in float32 on an AVX2 CPU, 9% of a one-stream step went to the copy and SDPA). This backend runs one C++
call per layer for the whole flat batch (decodes, chunked-prefill chunks and prompts together), each query reading
its keys and values straight from their blocks, and stores the step's new keys and values in one call. Two builds
of the same contract: `cpu_kernels/csrc/paged_attention.cpp` (AVX-512 BF16 CPUs, `torch.ops.xgenmm_cpu`) and
`paged_attention_avx2.cpp` (any AVX2 + FMA CPU, `torch.ops.xgenmm_avx2`); the first one built here is used. float32
and bfloat16, every row batch-invariant. Built ahead of time or once per machine (`xgenmm.cpu_kernels`), so no
process pays a compile. Batches it cannot take (another dtype, an unsupported head size, non-CPU tensors) go to the
reference.
"""

from __future__ import annotations

import torch

from ..errors import AttentionBackendUnavailableError
from .base import AttentionMetadata, KVCache
from .torch_ref import TorchReferenceBackend

_HEAD_DIMS = (16, 32, 64, 96, 128)  # the head sizes both builds are compiled for


def kernel_namespace() -> str | None:
    """The op namespace of the paged-attention kernel built for this CPU, or None where neither builds."""
    from .. import cpu_kernels

    if cpu_kernels.available():
        return "xgenmm_cpu"
    if cpu_kernels.int8_available():
        return "xgenmm_avx2"
    return None


class CpuPagedAttentionBackend:
    name = "cpu_paged"

    def __init__(self) -> None:
        from .. import cpu_kernels

        namespace = kernel_namespace()
        if namespace is None:
            raise AttentionBackendUnavailableError(
                f"the CPU paged-attention kernel is unavailable: {cpu_kernels.unavailable_reason()}; "
                f"{cpu_kernels.int8_unavailable_reason()}; use attention_backend=None (auto) or 'torch'")
        ops = getattr(torch.ops, namespace)
        self._op = ops.paged_attention
        self._store = ops.store_kv
        self._fallback = TorchReferenceBackend()

    @staticmethod
    def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
        return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.dtype == k_cache.dtype
                and q.shape[-1] in _HEAD_DIMS)

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
