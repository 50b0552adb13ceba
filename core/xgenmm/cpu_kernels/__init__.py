"""Our C++ CPU kernels: bf16 linear layers, paged attention read in place, fused small ops (AVX-512 BF16); the int8
weight-only and float32 packed linears, and AVX2 builds of the paged attention and the fused small ops (AVX2 + FMA).

`available()` builds/loads the AVX-512 BF16 library once per process (see `build.py`); its ops are
`torch.ops.xgenmm_cpu.*`:

* `linear_bf16(x, weight, bias)`: bf16 `x @ weight.T + bias` for small row counts, weight in its [N, K] layout;
* `paged_attention(out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window)`:
  causal attention of a flat varlen batch over the paged cache (see `attention/cpu_paged.py`);
* `rms_norm`, `add_rms_norm`, `silu_and_mul`, `rotary_embedding_`: a bf16 decoder layer's small ops, fused
  (see `model/cpu_fused_ops.py`).

`int8_available()` builds/loads the AVX2 library (`csrc/*_avx2.cpp`); its ops are `torch.ops.xgenmm_avx2.*`:

* `pack_int8_weight(q)` / `unpack_int8_weight(packed, N)`: an int8 [N, K] weight to / from 64-output panels;
* `int8_linear(x, packed, scales, bias, N)`: `(x @ q.T) * scales + bias` in x's dtype (bf16 or float32), float32
  accumulation, every row computed the same way whatever the batch (see `model/quant/linears.py`);
* `pack_f32_weight_` / `linear_f32`: the float32 language model's linears (see `model/cpu_linear.py`);
* `paged_attention`, `store_kv`: the same contract as above, float32 and bf16 (see `attention/cpu_paged.py`);
* `rms_norm`, `add_rms_norm`, `silu_and_mul`, `rotary_embedding_`: float32 and bf16 (see `model/cpu_fused_ops.py`).
"""

from __future__ import annotations

import torch

from .build import AVX2_INT8, cpu_supports_kernels, load, unavailable_reason


def available() -> bool:
    return load()


def int8_available() -> bool:
    """The AVX2 int8 linear is built and loaded (x86-64 with AVX2 + FMA, a compiler, XGENMM_CPU_KERNELS not 0)."""
    return load(AVX2_INT8)


def int8_unavailable_reason() -> str | None:
    return unavailable_reason(AVX2_INT8)


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


__all__ = ["available", "cpu_supports_kernels", "empty_hugepages", "int8_available", "int8_unavailable_reason", "load",
           "to_hugepages", "unavailable_reason"]
