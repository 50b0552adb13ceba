"""The attention-backend interface: per-step metadata is explicit, the KV cache is paged.

Every backend (reference PyTorch, FlexAttention, Triton) sees the same flat batch: the new tokens of all scheduled
sequences concatenated, plus this metadata. A backend stores the new keys/values into the paged cache at
`slot_mapping`, then computes causal attention of each new query over its sequence's whole context (cached prefix +
the new tokens up to and including itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionMetadata:
    """Per-step description of a flat batch of B sequences and T new tokens."""

    query_start_loc: torch.Tensor  # [B+1] int32: cumulative new-token counts; seq b owns rows [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence after this step (cached + new)
    context_lens: torch.Tensor  # [B] int32: tokens already in the cache before this step
    block_tables: torch.Tensor  # [B, max_blocks] int32: physical block ids (padding entries are 0)
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token; -1 = skip
    max_query_len: int
    max_seq_len: int
    block_size: int
    sliding_window: int | None = None  # None = full causal attention (see docs/architecture.md)
    # Host-side copies, so backends that loop on the CPU never synchronise with the device.
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    context_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]


class AttentionBackend(Protocol):
    """What the decoder needs from an attention implementation."""

    name: str

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, H, D]
        ...


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values into the paged cache (reference implementation; slots < 0 are skipped)."""
    k_cache, v_cache = kv_cache
    num_blocks, block_size, hkv, d = k_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    k_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[KVCache]:
    """One (k, v) pair per layer, carved out of a single allocation."""
    shape = (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    if torch.device(device).type == "cpu":  # decode streams the cache: 2 MiB pages where our kernels are built
        from ..cpu_kernels import empty_hugepages

        storage = empty_hugepages(shape, dtype).zero_()
    else:
        storage = torch.zeros(shape, dtype=dtype, device=device)
    return [(storage[0, i], storage[1, i]) for i in range(num_layers)]


def kv_cache_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
