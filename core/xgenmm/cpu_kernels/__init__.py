"""Our C++ CPU kernels (AVX-512 BF16): bf16 linear layers, paged attention read in place, fused small ops.

`available()` builds/loads them once per process (see `build.py`); the ops are `torch.ops.xgenmm_cpu.*`:

* `linear_bf16(x, weight, bias)`: bf16 `x @ weight.T + bias` for small row counts, weight in its [N, K] layout;
* `paged_attention(out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window)`:
  causal attention of a flat varlen batch over the paged cache (see `attention/cpu_paged.py`);
* `rms_norm`, `add_rms_norm`, `silu_and_mul`, `rotary_embedding_`: a bf16 decoder layer's small ops, fused
  (see `model/cpu_fused_ops.py`).
"""

from __future__ import annotations

import torch

from .build import cpu_supports_kernels, load, unavailable_reason


def available() -> bool:
    return load()


def empty_hugepages(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor backed by 2 MiB pages where the kernels are built (`empty_hugepage` in
    csrc/linear_bf16_packed.cpp: streaming reads of 4 KiB-paged memory lose ~10% of the bandwidth to TLB misses),
    an ordinary one elsewhere. For the memory a decode step streams: the KV cache and the LM head."""
    if available():
        return torch.ops.xgenmm_cpu.empty_hugepage(list(shape), dtype)
    return torch.empty(shape, dtype=dtype)


def to_hugepages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor in `empty_hugepages` memory."""
    return empty_hugepages(tensor.shape, tensor.dtype).copy_(tensor)


__all__ = ["available", "cpu_supports_kernels", "empty_hugepages", "load", "to_hugepages", "unavailable_reason"]
