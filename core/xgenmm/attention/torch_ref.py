"""Reference attention backend: gather each sequence's KV from the paged cache and run SDPA.

Plain PyTorch, runs on CPU and GPU. It is the oracle the faster backends are tested against, and the CPU path.
Pure-decode steps are batched into one padded SDPA call; steps with prefill chunks loop over sequences, one 4-D
SDPA call each (so CPU takes torch's flash kernel).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .base import AttentionMetadata, KVCache, store_kv


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())  # [nb, bs, Hkv, D]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:length]  # [L, Hkv, D]


_WORKSPACES = threading.local()  # per thread: each engine loop runs its model on its own thread


def _workspace(cache: torch.Tensor, which: int, num_blocks: int) -> torch.Tensor:
    """A reusable [num_blocks, block_size, Hkv, D] buffer per (thread, device, dtype, block shape); grows as needed."""
    if not hasattr(_WORKSPACES, "buffers"):
        _WORKSPACES.buffers = {}
    key = (cache.device, cache.dtype, tuple(cache.shape[1:]), which)
    buf = _WORKSPACES.buffers.get(key)
    if buf is None or buf.shape[0] < num_blocks:
        buf = torch.empty((max(num_blocks, 2 * (buf.shape[0] if buf is not None else 0)), *cache.shape[1:]),
                          dtype=cache.dtype, device=cache.device)
        _WORKSPACES.buffers[key] = buf
    return buf[:num_blocks]


def _causal_mask(q_len: int, kv_len: int, context_len: int, window: int | None, device) -> torch.Tensor:
    q_pos = torch.arange(context_len, context_len + q_len, device=device).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class TorchReferenceBackend:
    name = "torch"

    def forward(self, q, k, v, kv_cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, kv_cache, meta.slot_mapping)
        k_cache, v_cache = kv_cache
        heads, kv_heads = q.shape[1], k.shape[1]
        group = heads // kv_heads
        qsl = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        ctx_lens = meta.context_lens_cpu or meta.context_lens.tolist()
        if meta.max_query_len == 1 and meta.sliding_window is None and qsl[-1] == len(seq_lens):  # no empty rows
            return self._decode(q, k_cache, v_cache, meta, seq_lens, scale, group)
        out = torch.empty_like(q)
        for b in range(len(seq_lens)):
            start, end = qsl[b], qsl[b + 1]
            if end == start:
                continue
            kv_len = seq_lens[b]
            keys = _gather_context(k_cache, meta.block_tables[b], kv_len, meta.block_size)
            values = _gather_context(v_cache, meta.block_tables[b], kv_len, meta.block_size)
            if group > 1:
                keys = keys.repeat_interleave(group, dim=1)
                values = values.repeat_interleave(group, dim=1)
            # 4-D [1, H, q, D]: with a batch dimension CPU SDPA takes its flash kernel; 3-D inputs fall back to the
            # math path, 3-4x slower on a 700-token prompt (an image's prefill). A fresh prompt (nothing cached, no
            # window) is plain causal attention: `is_causal` lets the kernel skip the masked blocks.
            qb = q[start:end].transpose(0, 1).unsqueeze(0)
            kb = keys.transpose(0, 1).to(q.dtype).unsqueeze(0)
            vb = values.transpose(0, 1).to(q.dtype).unsqueeze(0)
            if ctx_lens[b] == 0 and kv_len == end - start and meta.sliding_window is None:
                ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
            else:
                mask = _causal_mask(end - start, kv_len, ctx_lens[b], meta.sliding_window, q.device)
                ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
            out[start:end] = ob[0].transpose(0, 1)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta, seq_lens, scale, group) -> torch.Tensor:
        """One new token per sequence: pad every context to the longest and run one batched SDPA."""
        bsz = len(seq_lens)
        max_len = max(seq_lens)
        bs = meta.block_size
        nb = (max_len + bs - 1) // bs
        index = meta.block_tables[:, :nb].reshape(-1).long()  # [B * nb]
        shape = (bsz, nb * bs, k_cache.shape[2], k_cache.shape[3])
        # Gather into reused workspaces: a fresh 10-100 MB tensor per layer costs more in page faults than the copy.
        keys = torch.index_select(k_cache, 0, index, out=_workspace(k_cache, 0, index.numel())).view(shape)[:, :max_len]
        values = torch.index_select(v_cache, 0, index, out=_workspace(v_cache, 1, index.numel())).view(shape)[:, :max_len]
        if group > 1:
            keys = keys.repeat_interleave(group, dim=2)
            values = values.repeat_interleave(group, dim=2)
        lens = meta.seq_lens.to(q.device).long().unsqueeze(1)
        mask = (torch.arange(max_len, device=q.device).unsqueeze(0) < lens).view(bsz, 1, 1, max_len)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, H, 1, D]
            keys.transpose(1, 2).to(q.dtype),
            values.transpose(1, 2).to(q.dtype),
            attn_mask=mask,
            scale=scale,
        )
        return out.squeeze(2)
