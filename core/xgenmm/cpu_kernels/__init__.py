"""Our C++ CPU kernels (AVX-512 BF16): bf16 linear layers at decode sizes and paged attention read in place.

`available()` builds/loads them once per process (see `build.py`); the ops are `torch.ops.xgenmm_cpu.*`:

* `linear_bf16(x, weight, bias)`: bf16 `x @ weight.T + bias` for small row counts, weight in its [N, K] layout;
* `paged_attention(out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window)`:
  causal attention of a flat varlen batch over the paged cache (see `attention/cpu_paged.py`).
"""

from __future__ import annotations

from .build import cpu_supports_kernels, load, unavailable_reason


def available() -> bool:
    return load()


__all__ = ["available", "cpu_supports_kernels", "load", "unavailable_reason"]
