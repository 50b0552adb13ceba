"""FlexAttention backend over the paged KV cache (second GPU backend and cross-check; also runs eagerly on CPU).

Every step's sequences become one flex batch: queries padded to `[B, H, max_query_len, D]`, keys/values are the
paged cache itself seen as one long sequence `[1, Hkv, num_blocks * block_size, D]` (a view, no copy; flex
broadcasts it over the batch). The BlockMask is built directly from the block tables with KV block size = page
size, in the spirit of `torch.nn.attention.experimental._paged_attention.PagedAttention`: row tile r of sequence b
lists the physical pages its queries can see (partial pages, plus "full" pages that need no mask), and the
mask_mod maps a physical key index back to its logical position through a per-step physical->logical table, then
applies causality and the optional sliding window. Pages of other sequences, padding pages and padding rows are
masked out, so the mask_mod alone is exact (the eager CPU path evaluates only it).

`kv_layout="gathered"` copies the pages this step uses into a compact `[B, Hkv, pages * block_size, D]` buffer
first (same BlockMask construction, identity page table). That is what the CPU default uses, because eager flex
evaluates every (query, key) pair and the whole cache would be far larger than the step's contexts, and what
head-dim padding uses (96 -> 128 for compiled kernels that want a power of two; scale stays 1/sqrt(96) as given).

Compilation is opt-in (`compile=True`, GPU); tests run eager on CPU. The per-step plan (BlockMask and index
tensors) is built once per `AttentionMetadata` object and reused by every layer of the step; building it never
synchronises with the host (all sizes come from shapes and the metadata's host ints).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..errors import ConfigError
from .base import AttentionMetadata, KVCache, store_kv

KV_LAYOUTS = ("paged", "gathered")


@dataclass
class _FlexStepPlan:
    """Index tensors and BlockMask of one step (shared by all layers)."""

    meta: AttentionMetadata
    layout: str
    num_cache_blocks: int
    q_index: torch.Tensor  # [B, Lq] flat row of each padded query (clamped for padding rows)
    out_seq: torch.Tensor  # [T] sequence of each flat row
    out_local: torch.Tensor  # [T] row inside that sequence's padded queries
    gather_pages: torch.Tensor | None  # [B, P] physical pages to copy (gathered layout)
    block_mask: BlockMask


def _cdiv(a, b):
    return (a + b - 1) // b


class FlexAttentionBackend:
    """`forward(q, k, v, kv_cache, meta, scale)` with `flex_attention` over the paged cache.

    kv_layout: "paged" (zero-copy view of the cache), "gathered" (compact copy of the step's pages), or None =
    paged on CUDA, gathered on CPU. pad_head_dim: pad D to the next power of two (forces "gathered"); None = only
    when compiling on CUDA with a non-power-of-two D. compile: run `torch.compile(flex_attention)` (GPU).
    """

    name = "flex"

    def __init__(
        self,
        kv_layout: str | None = None,
        pad_head_dim: bool | None = None,
        compile: bool = False,
        q_block_size: int = 128,
        kernel_options: dict | None = None,
    ) -> None:
        if kv_layout is not None and kv_layout not in KV_LAYOUTS:
            raise ConfigError(f"kv_layout must be one of {KV_LAYOUTS} or None, got {kv_layout!r}")
        self.kv_layout = kv_layout
        self.pad_head_dim = pad_head_dim
        self.compile = compile
        self.q_block_size = q_block_size
        self.kernel_options = kernel_options
        # Default dynamic-shape handling: steps differ in batch and query length; static compiles would recompile
        # per shape and hit the recompile limit.
        self._flex = torch.compile(flex_attention) if compile else flex_attention
        self._plan: _FlexStepPlan | None = None

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        store_kv(k, v, kv_cache, meta.slot_mapping)
        num_tokens, num_heads, head_dim = q.shape
        if num_tokens == 0 or meta.num_seqs == 0:
            return torch.empty_like(q)
        num_blocks, block_size, num_kv_heads, _ = k_cache.shape
        pad = self.pad_head_dim
        if pad is None:
            pad = self.compile and q.device.type == "cuda" and head_dim & (head_dim - 1) != 0
        layout = self.kv_layout or ("paged" if q.device.type == "cuda" else "gathered")
        if pad:
            layout = "gathered"
        plan = self._plan_for(meta, layout, num_blocks, num_tokens, q.device)

        padded_dim = 1 << (head_dim - 1).bit_length() if pad else head_dim
        if layout == "paged":
            keys = k_cache.view(1, num_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)
            values = v_cache.view(1, num_blocks * block_size, num_kv_heads, head_dim).transpose(1, 2)
        else:
            pages = plan.gather_pages
            keys = k_cache[pages].flatten(1, 2).transpose(1, 2)  # [B, Hkv, P*bs, D]
            values = v_cache[pages].flatten(1, 2).transpose(1, 2)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        queries = q[plan.q_index].transpose(1, 2)  # [B, H, Lq, D]
        if padded_dim != head_dim:
            extra = (0, padded_dim - head_dim)
            queries, keys, values = F.pad(queries, extra), F.pad(keys, extra), F.pad(values, extra)
        out = self._flex(
            queries,
            keys,
            values,
            block_mask=plan.block_mask,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
            kernel_options=self._kernel_options(block_size, q.device),
        )  # [B, H, Lq, Dp]
        out = out.transpose(1, 2)[plan.out_seq, plan.out_local]  # [T, H, Dp]
        return out[..., :head_dim].contiguous() if padded_dim != head_dim else out

    def _kernel_options(self, block_size: int, device: torch.device) -> dict | None:
        """The compiled kernels walk KV in BLOCK_N steps that must divide the page size (BlockMask KV block)."""
        if device.type != "cuda" or not self.compile:
            return self.kernel_options
        options = dict(self.kernel_options or {})
        if block_size < 128:
            options.setdefault("BLOCK_N", block_size)
        return options

    # ------------------------------------------------------------------ per-step plan

    def _plan_for(self, meta, layout, num_blocks, num_tokens, device) -> _FlexStepPlan:
        plan = self._plan
        if plan is not None and plan.meta is meta and plan.layout == layout and plan.num_cache_blocks == num_blocks:
            return plan
        self._plan = plan = self._build_plan(meta, layout, num_blocks, num_tokens, device)
        return plan

    def _build_plan(self, meta: AttentionMetadata, layout: str, num_blocks: int, num_tokens: int, device):
        bs = meta.block_size
        qsl = meta.query_start_loc.to(device=device, dtype=torch.long)
        seq_lens = meta.seq_lens.to(device=device, dtype=torch.long)
        tables = meta.block_tables.to(device=device, dtype=torch.long)
        num_seqs = seq_lens.shape[0]
        q_len = qsl[1:] - qsl[:-1]
        ctx = seq_lens - q_len
        lq = max(int(meta.max_query_len), 1)

        local = torch.arange(lq, device=device)
        q_index = (qsl[:-1, None] + local).clamp(max=num_tokens - 1)
        q_valid = local[None, :] < q_len[:, None]  # [B, Lq]
        q_pos = ctx[:, None] + local[None, :]

        rows = torch.arange(num_tokens, device=device)
        out_seq = torch.searchsorted(qsl[1:], rows, right=True).clamp(max=num_seqs - 1)
        out_local = (rows - qsl[out_seq]).clamp(0, lq - 1)

        # Which pages the KV tensor holds, and where each sequence's logical pages live in it.
        if layout == "paged":
            page_table = tables  # logical page -> physical block
            num_pages = num_blocks
            gather_pages = None
        else:
            used = max(_cdiv(int(meta.max_seq_len), bs), 1)
            gather_pages = tables[:, :used]
            page_table = torch.arange(used, device=device).expand(num_seqs, used)
            num_pages = used
        cols = page_table.shape[1]
        logical = torch.arange(cols, device=device)
        live = logical[None, :] < _cdiv(seq_lens, bs)[:, None]
        phys_to_logical = torch.full((num_seqs, num_pages + 1), -1, dtype=torch.long, device=device)
        phys_to_logical.scatter_(
            1, torch.where(live, page_table, num_pages), torch.where(live, logical[None, :].expand_as(live), -1)
        )
        phys_to_logical = phys_to_logical[:, :num_pages].contiguous()

        window = meta.sliding_window

        def mask_mod(b, h, q_idx, kv_idx):
            logical_page = phys_to_logical[b, kv_idx // bs]
            key_pos = logical_page * bs + kv_idx % bs
            query_pos = q_pos[b, q_idx]
            visible = q_valid[b, q_idx] & (logical_page >= 0) & (key_pos <= query_pos)
            if window is not None:
                visible = visible & (key_pos > query_pos - window)
            return visible

        block_mask = self._block_mask(page_table, q_len, ctx, lq, num_pages, bs, window, mask_mod, device)
        return _FlexStepPlan(meta, layout, num_blocks, q_index, out_seq, out_local, gather_pages, block_mask)

    def _block_mask(self, page_table, q_len, ctx, lq, num_pages, bs, window, mask_mod, device) -> BlockMask:
        """Per (sequence, query-row tile): full pages (no masking needed) and partial pages, as physical ids."""
        qb = self.q_block_size
        num_rows = _cdiv(lq, qb)
        r = torch.arange(num_rows, device=device)[None, :]
        first = r * qb  # first local row of the tile
        last = torch.minimum(q_len[:, None], first + qb) - 1  # last real local row
        has_rows = first < q_len[:, None]
        min_pos, max_pos = ctx[:, None] + first, ctx[:, None] + last
        hi = torch.where(has_rows, max_pos // bs + 1, 0)  # pages [lo, hi) are touched
        if window is None:
            lo = torch.zeros_like(hi)
            full_lo = lo
        else:
            lo = (min_pos - window + 1).clamp(min=0) // bs
            full_lo = torch.maximum(torch.div(max_pos - window, bs, rounding_mode="floor") + 1, lo)
        full_hi = torch.minimum((min_pos + 1) // bs, hi)  # pages entirely at or before the first row
        full_lo = torch.minimum(full_lo, hi)
        num_full = (full_hi - full_lo).clamp(min=0)
        full_hi = full_lo + num_full
        lo = torch.where(has_rows, lo, 0)
        num_partial = torch.where(has_rows, (hi - lo) - num_full, 0)

        cols = page_table.shape[1]
        j = torch.arange(num_pages, device=device)[None, None, :]

        def physical(logical_pages):
            idx = logical_pages.clamp(0, cols - 1)
            return torch.gather(page_table[:, None, :].expand(-1, num_rows, -1), 2, idx).to(torch.int32)

        before = (full_lo - lo)[..., None]  # partial pages before the full run, then those after it
        partial_logical = torch.where(j < before, lo[..., None] + j, full_hi[..., None] + (j - before))
        partial_idx = torch.where(j < num_partial[..., None], physical(partial_logical), 0)
        full_idx = torch.where(j < num_full[..., None], physical(full_lo[..., None] + j), 0)
        return BlockMask.from_kv_blocks(
            num_partial.to(torch.int32)[:, None],
            partial_idx[:, None],
            num_full.to(torch.int32)[:, None],
            full_idx[:, None],
            BLOCK_SIZE=(qb, bs),
            mask_mod=mask_mod,
            seq_lengths=(lq, num_pages * bs),
            compute_q_blocks=False,
        )
