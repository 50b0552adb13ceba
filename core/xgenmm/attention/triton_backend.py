"""GPU attention backend on our own Triton kernels (see triton_kernels.py).

One `store_kvcache` launch plus one attention launch per layer (two with split-KV), whatever mix of prefill
chunks, prefix-cache hits and decodes the step holds. The hot path never reads device tensors on the host: launch
shapes come from tensor shapes, and the split-KV choice from the metadata's host ints (`max_query_len`,
`max_seq_len`, number of sequences), so a padded decode step (padding sequences with seq_len 0 / query len 0,
slot -1) has fixed launches and can be captured in a CUDA graph. The split choice is baked into a captured graph;
the split kernel is correct for any lengths, so capture with the largest `max_seq_len` the graph will replay with.
"""

from __future__ import annotations

import torch

from ..errors import AttentionBackendUnavailableError
from .base import AttentionMetadata, KVCache


try:
    from . import triton_kernels as _kernels
except ImportError as exc:  # triton missing: let get_attention_backend fall back
    raise ImportError(f"the 'triton' attention backend needs the triton package: {exc}") from exc


class TritonBackend:
    """`forward(q, k, v, kv_cache, meta, scale)`: store new k/v at `meta.slot_mapping`, then paged causal attention.

    `num_kv_splits`: None = choose per step from host numbers; 1 = never split; 2^k = always split k ways.
    `launch_config`: fixed tile shapes (for tuning); None = defaults by query length.
    """

    name = "triton"

    def __init__(
        self, num_kv_splits: int | None = None, launch_config: _kernels.AttentionLaunchConfig | None = None
    ) -> None:
        self.num_kv_splits = num_kv_splits
        self.launch_config = launch_config

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if q.device.type != "cuda" and not _kernels.interpreting():
            raise AttentionBackendUnavailableError(
                f"the 'triton' attention backend runs on CUDA tensors (got {q.device}); "
                "use 'torch' or 'flex' on CPU, or set TRITON_INTERPRET=1 for kernel tests"
            )
        k_cache, v_cache = kv_cache
        if meta.block_size != k_cache.shape[1]:
            raise ValueError(f"metadata block_size {meta.block_size} != cache block size {k_cache.shape[1]}")
        _kernels.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        return _kernels.unified_attention(
            q,
            k_cache,
            v_cache,
            query_start_loc=meta.query_start_loc,
            seq_lens=meta.seq_lens,
            block_tables=meta.block_tables,
            scale=scale,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            sliding_window=meta.sliding_window,
            num_kv_splits=self.num_kv_splits,
            config=self.launch_config,
        )

    def num_kv_splits_for(self, meta: AttentionMetadata, num_kv_heads: int, device: torch.device) -> int:
        """The split count `forward` would use for this step (e.g. to key CUDA graphs by it)."""
        if self.num_kv_splits is not None:
            return self.num_kv_splits
        return _kernels.choose_num_kv_splits(
            meta.num_seqs, num_kv_heads, meta.max_query_len, meta.max_seq_len, torch.device(device)
        )
