"""Triton kernels for paged attention over the cache layout `[num_blocks, block_size, num_kv_heads, head_dim]`.

Three kernels and their host wrappers:

* `store_kvcache`: scatter the step's new keys/values into the cache at `slot_mapping` (one program per token,
  slot -1 = skip).
* `unified_attention`: one launch for a whole mixed batch (prefill, chunked prefill over a cached prefix,
  prefix-cache hits, decode). Program (tile, kv_head) owns BLOCK_Q query tokens of one sequence times the query
  heads that share kv_head (GQA packed along M); it walks that sequence's keys through the block table in TILE_N
  chunks with an online softmax in fp32. head_dim is padded to a power of two in registers only (96 -> 128).
* split-KV ("flash decoding"): the same per-tile work cut into NUM_SPLITS contiguous key ranges, each writing an
  unnormalised partial result, then `_merge_kv_splits_kernel` combines them. Used when a decode batch has too few
  (sequence, kv_head) pairs to fill the GPU.

Query tiles are located without any host work: sequence b owns tile ids [qsl[b] // BLOCK_Q + b, qsl[b+1] // BLOCK_Q
+ b + 1); that interval is never shorter than ceil(q_len / BLOCK_Q), the start ids are strictly increasing, so a
binary search over `query_start_loc` finds a tile's sequence, and a grid of T // BLOCK_Q + B programs covers every
batch. The grid depends only on tensor shapes, so a padded decode batch has fixed launch shapes (CUDA graphs).

Positions: a sequence with q_len new tokens and seq_len total tokens has context_len = seq_len - q_len cached
tokens; its new row i sits at position context_len + i and attends to keys at positions <= it (and, with a window
W, > position - W). Padding sequences (seq_len 0, q_len 0) launch programs that exit at once.

Under TRITON_INTERPRET=1 (CPU tests) Triton 3.5's interpreter computes bf16 `tl.dot` wrongly, so the wrappers set
UPCAST_DOT there: operands are widened to fp32 after the same roundings the GPU path does (bf16 x bf16 products
are exact in fp32, so only the summation order differs).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------------------------
# store_kvcache
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _store_kvcache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    kc_stride_b,
    kc_stride_s,
    kc_stride_h,
    vc_stride_b,
    vc_stride_s,
    vc_stride_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, D_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    k = tl.load(k_ptr + token * k_stride_t + heads * k_stride_h + dims, mask=mask)
    v = tl.load(v_ptr + token * v_stride_t + heads * v_stride_h + dims, mask=mask)
    k_dst = k_cache_ptr + block * kc_stride_b + offset * kc_stride_s + heads * kc_stride_h + dims
    v_dst = v_cache_ptr + block * vc_stride_b + offset * vc_stride_s + heads * vc_stride_h + dims
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k/v `[T, Hkv, D]` into the paged caches at `slot_mapping[T]` (negative slots are skipped)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _, block_size, cache_heads, cache_dim = k_cache.shape
    if (cache_heads, cache_dim) != (num_kv_heads, head_dim) or v.shape != k.shape or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"store_kvcache: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit caches {tuple(k_cache.shape)} / "
            f"{tuple(v_cache.shape)}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("store_kvcache: the caches' last dimension must be contiguous")
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    _prepare_launch()
    _store_kvcache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
    )


# --------------------------------------------------------------------------------------------------------------
# attention: shared device helpers
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_to_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest b with qsl[b] // BLOCK_Q + b <= tile (binary search; the keys are strictly increasing)."""
    lo = num_seqs * 0  # same (tensor) type as hi: both are loop-carried
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_key_range(
    q,  # [BLOCK_M, D_PAD] in the input dtype
    acc,  # [BLOCK_M, D_PAD] fp32
    m_i,  # [BLOCK_M] fp32 running max (log2 domain)
    l_i,  # [BLOCK_M] fp32 running sum
    q_pos,  # [BLOCK_M] absolute positions of the rows
    key_start,
    key_end,
    k_cache_ptr,
    v_cache_ptr,
    block_table_row_ptr,
    kv_head,
    kc_stride_b,
    kc_stride_s,
    kc_stride_h,
    vc_stride_b,
    vc_stride_s,
    vc_stride_h,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax accumulation of keys [key_start, key_end) (key_start a multiple of TILE_N)."""
    dims = tl.arange(0, D_PAD)
    dim_mask = dims < HEAD_DIM
    k_head_off = kv_head * kc_stride_h
    v_head_off = kv_head * vc_stride_h
    if UPCAST_DOT:
        q = q.to(tl.float32)
    for tile_start in range(key_start, key_end, TILE_N):
        key_pos = tile_start + tl.arange(0, TILE_N)
        key_valid = key_pos < key_end
        physical = tl.load(block_table_row_ptr + key_pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        in_block = (key_pos % BLOCK_SIZE).to(tl.int64)
        k_rows = physical * kc_stride_b + in_block * kc_stride_s + k_head_off  # [TILE_N]
        v_rows = physical * vc_stride_b + in_block * vc_stride_s + v_head_off
        k = tl.load(
            k_cache_ptr + k_rows[None, :] + dims[:, None],
            mask=dim_mask[:, None] & key_valid[None, :],
            other=0.0,
        )  # [D_PAD, TILE_N]
        v = tl.load(
            v_cache_ptr + v_rows[:, None] + dims[None, :],
            mask=key_valid[:, None] & dim_mask[None, :],
            other=0.0,
        )  # [TILE_N, D_PAD]
        if UPCAST_DOT:
            k = k.to(tl.float32)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, TILE_N] fp32
        visible = (key_pos[None, :] <= q_pos[:, None]) & key_valid[None, :]
        if SLIDING_WINDOW > 0:
            visible = visible & (key_pos[None, :] > q_pos[:, None] - SLIDING_WINDOW)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # Rows that have seen no visible key yet keep max -inf; shift them by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp2(scores - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_cast = p.to(v.dtype)
        if UPCAST_DOT:
            p_cast = p_cast.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_cast, v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _load_query_tile(
    q_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    tile,
    kv_head,
    num_seqs,
    q_stride_t,
    q_stride_h,
    NUM_QUERIES_PER_KV: tl.constexpr,
    QPKV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Find the tile's sequence and load its query rows; rows are (token, head-in-group) pairs."""
    seq = _tile_to_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = tile - (q_start // BLOCK_Q + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    row_token = local_block * BLOCK_Q + rows // QPKV_PAD  # token index inside the sequence's new tokens
    row_head = kv_head * NUM_QUERIES_PER_KV + rows % QPKV_PAD
    row_valid = (row_token < q_len) & ((rows % QPKV_PAD) < NUM_QUERIES_PER_KV)
    dims = tl.arange(0, D_PAD)
    row_off = (q_start + row_token).to(tl.int64) * q_stride_t + row_head * q_stride_h
    q = tl.load(q_ptr + row_off[:, None] + dims[None, :], mask=row_valid[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    q_pos = context_len + row_token
    # Keys this tile can see: up to the position of its last real row, from the window start of its first row.
    first_pos = context_len + local_block * BLOCK_Q
    last_pos = context_len + tl.minimum(q_len, (local_block + 1) * BLOCK_Q) - 1
    return seq, q_start, q_len, local_block, q, q_pos, row_token, row_head, row_valid, first_pos, last_pos


@triton.jit
def _window_start(first_pos, SLIDING_WINDOW: tl.constexpr, TILE_N: tl.constexpr):
    if SLIDING_WINDOW > 0:
        start = tl.maximum(first_pos - SLIDING_WINDOW + 1, 0)
        start = (start // TILE_N) * TILE_N
    else:
        start = first_pos * 0
    return start


# --------------------------------------------------------------------------------------------------------------
# attention kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_seqs"])  # 1 would become a constexpr
def _unified_attention_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    num_seqs,
    scale_log2,
    q_stride_t,
    q_stride_h,
    o_stride_t,
    o_stride_h,
    kc_stride_b,
    kc_stride_s,
    kc_stride_h,
    vc_stride_b,
    vc_stride_s,
    vc_stride_h,
    bt_stride,
    NUM_QUERIES_PER_KV: tl.constexpr,
    QPKV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq, q_start, q_len, local_block, q, q_pos, row_token, row_head, row_valid, first_pos, last_pos = _load_query_tile(
        q_ptr, query_start_loc_ptr, seq_lens_ptr, tile, kv_head, num_seqs, q_stride_t, q_stride_h,
        NUM_QUERIES_PER_KV, QPKV_PAD, HEAD_DIM, D_PAD, BLOCK_Q, BLOCK_M,
    )  # fmt: skip
    if local_block * BLOCK_Q >= q_len:
        return
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    key_start = _window_start(first_pos, SLIDING_WINDOW, TILE_N)
    acc, m_i, l_i = _attend_key_range(
        q, acc, m_i, l_i, q_pos, key_start, last_pos + 1, k_cache_ptr, v_cache_ptr,
        block_tables_ptr + seq.to(tl.int64) * bt_stride, kv_head,
        kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, scale_log2,
        HEAD_DIM, D_PAD, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, UPCAST_DOT, DOT_PRECISION,
    )  # fmt: skip
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    result = acc / l_safe[:, None]
    dims = tl.arange(0, D_PAD)
    out_off = (q_start + row_token).to(tl.int64) * o_stride_t + row_head * o_stride_h
    tl.store(
        out_ptr + out_off[:, None] + dims[None, :],
        result.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (dims < HEAD_DIM)[None, :],
    )


@triton.jit(do_not_specialize=["num_seqs"])  # 1 would become a constexpr
def _split_kv_attention_kernel(
    part_acc_ptr,  # [T, H, NUM_SPLITS, D_PAD] fp32, unnormalised
    part_max_ptr,  # [T, H, NUM_SPLITS] fp32 (log2 domain)
    part_sum_ptr,  # [T, H, NUM_SPLITS] fp32
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    num_seqs,
    scale_log2,
    q_stride_t,
    q_stride_h,
    kc_stride_b,
    kc_stride_s,
    kc_stride_h,
    vc_stride_b,
    vc_stride_s,
    vc_stride_h,
    bt_stride,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_QUERIES_PER_KV: tl.constexpr,
    QPKV_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq, q_start, q_len, local_block, q, q_pos, row_token, row_head, row_valid, first_pos, last_pos = _load_query_tile(
        q_ptr, query_start_loc_ptr, seq_lens_ptr, tile, kv_head, num_seqs, q_stride_t, q_stride_h,
        NUM_QUERIES_PER_KV, QPKV_PAD, HEAD_DIM, D_PAD, BLOCK_Q, BLOCK_M,
    )  # fmt: skip
    if local_block * BLOCK_Q >= q_len:
        return
    key_start = _window_start(first_pos, SLIDING_WINDOW, TILE_N)
    key_end = last_pos + 1
    tiles_per_split = tl.cdiv(tl.cdiv(key_end - key_start, TILE_N), NUM_SPLITS)
    split_start = key_start + split * tiles_per_split * TILE_N
    split_end = tl.minimum(key_end, split_start + tiles_per_split * TILE_N)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_key_range(
        q, acc, m_i, l_i, q_pos, split_start, split_end, k_cache_ptr, v_cache_ptr,
        block_tables_ptr + seq.to(tl.int64) * bt_stride, kv_head,
        kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, scale_log2,
        HEAD_DIM, D_PAD, BLOCK_SIZE, TILE_N, SLIDING_WINDOW, UPCAST_DOT, DOT_PRECISION,
    )  # fmt: skip
    dims = tl.arange(0, D_PAD)
    part_row = ((q_start + row_token).to(tl.int64) * NUM_HEADS + row_head) * NUM_SPLITS + split
    tl.store(part_acc_ptr + part_row[:, None] * D_PAD + dims[None, :], acc, mask=row_valid[:, None])
    tl.store(part_max_ptr + part_row, m_i, mask=row_valid)
    tl.store(part_sum_ptr + part_row, l_i, mask=row_valid)


@triton.jit
def _merge_kv_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    query_start_loc_ptr,
    num_seqs,
    o_stride_t,
    o_stride_h,
    NUM_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """out[token, head] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_seqs):
        return  # a padding row that belongs to no sequence: its partials were never written
    splits = tl.arange(0, NUM_SPLITS)
    base = (token.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS
    m_s = tl.load(part_max_ptr + base + splits)
    l_s = tl.load(part_sum_ptr + base + splits)
    m_max = tl.max(m_s, axis=0)
    m_shift = tl.where(m_max > float("-inf"), m_max, 0.0)
    w = tl.exp2(m_s - m_shift)
    total = tl.sum(w * l_s, axis=0)
    dims = tl.arange(0, D_PAD)
    acc = tl.load(part_acc_ptr + (base + splits)[:, None] * D_PAD + dims[None, :])
    result = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + token.to(tl.int64) * o_stride_t + head * o_stride_h + dims,
        result.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _fix_interpreter_scalar_index() -> None:
    """Triton 3.5's interpreter turns scalars into shape-(1,) arrays and converts them with `int(array)`, which
    NumPy >= 2.4 refuses; `range(runtime_start, runtime_end)` in a kernel then fails. Convert via the element."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor):
        original(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    interpreter._patch_lang_tensor = patch_lang_tensor


def _prepare_launch() -> None:
    if interpreting():
        _fix_interpreter_scalar_index()


@dataclass(frozen=True)
class AttentionLaunchConfig:
    """Tile shapes and launch parameters of one attention launch (tunable on the GPU)."""

    block_m: int  # query rows per program = BLOCK_Q tokens x padded queries-per-kv-head
    tile_n: int  # keys per inner iteration
    num_warps: int = 4
    num_stages: int = 2


def default_launch_config(max_query_len: int, queries_per_kv: int, head_dim_padded: int) -> AttentionLaunchConfig:
    """Small M for decode-like batches (no wasted rows), 64 rows for prefill; tl.dot needs every dim >= 16."""
    group = triton.next_power_of_2(queries_per_kv)
    if max_query_len * group <= 16:
        block_m = max(16, group)
    else:
        block_m = max(64, group)
    tile_n = 64 if head_dim_padded <= 128 else 32
    num_warps = 4 if block_m <= 64 else 8
    return AttentionLaunchConfig(block_m=block_m, tile_n=tile_n, num_warps=num_warps, num_stages=2)


@functools.lru_cache(maxsize=8)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_kv_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_query_len: int,
    max_seq_len: int,
    device: torch.device,
    max_splits: int = 16,
    min_keys_per_split: int = 256,
) -> int:
    """How many key splits a launch should use (1 = the unified kernel), from host-side numbers only.

    Split-KV pays off for decode when the (sequence, kv_head) programs cannot fill the GPU and contexts are long:
    aim for ~2 programs per SM, never splits shorter than `min_keys_per_split` keys. Powers of two only, so a
    handful of kernel variants cover every batch.
    """
    if max_query_len != 1 or num_seqs == 0:
        return 1
    sms = _multiprocessor_count(device.index or 0) if device.type == "cuda" else 132
    programs = num_seqs * num_kv_heads
    wanted = (2 * sms) // max(programs, 1)
    by_length = max_seq_len // min_keys_per_split
    splits = min(wanted, by_length, max_splits)
    if splits < 2:
        return 1
    return 1 << (splits.bit_length() - 1)


def unified_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    sliding_window: int | None = None,
    num_kv_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: AttentionLaunchConfig | None = None,
) -> torch.Tensor:
    """Causal paged attention of a flat varlen batch; picks the unified or split-KV kernel from host numbers.

    `num_kv_splits=None` chooses with `choose_num_kv_splits`; 1 forces the unified kernel; a power of two >= 2
    forces split-KV (any batch shape is valid for it). No device->host synchronisation happens here.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"unified_attention: q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if block_size & (block_size - 1):
        raise ValueError(f"unified_attention: block_size must be a power of two, got {block_size}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("unified_attention: k/v caches need the same strides and a contiguous last dimension")
    if block_tables.shape[0] != num_seqs or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"unified_attention: block_tables {tuple(block_tables.shape)} / query_start_loc "
            f"{tuple(query_start_loc.shape)} do not match {num_seqs} sequences"
        )
    q = _last_dim_contiguous(q)
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out

    queries_per_kv = num_heads // num_kv_heads
    qpkv_pad = triton.next_power_of_2(queries_per_kv)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    cfg = config or default_launch_config(max_query_len, queries_per_kv, d_pad)
    block_m = max(cfg.block_m, qpkv_pad)
    block_q = block_m // qpkv_pad
    num_tiles = num_tokens // block_q + num_seqs
    window = int(sliding_window) if sliding_window else 0
    upcast = interpreting() and q.dtype != torch.float32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(num_seqs, num_kv_heads, max_query_len, max_seq_len, q.device)
    if num_kv_splits < 1 or num_kv_splits & (num_kv_splits - 1):
        raise ValueError(f"unified_attention: num_kv_splits must be a power of two >= 1, got {num_kv_splits}")

    common = dict(
        NUM_QUERIES_PER_KV=queries_per_kv,
        QPKV_PAD=qpkv_pad,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        TILE_N=cfg.tile_n,
        SLIDING_WINDOW=window,
        UPCAST_DOT=upcast,
        DOT_PRECISION=precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    scale_log2 = float(scale) * LOG2E
    _prepare_launch()
    if num_kv_splits == 1:
        _unified_attention_kernel[(num_tiles, num_kv_heads)](
            out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, num_seqs, scale_log2,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), **common,
        )  # fmt: skip
        return out

    part_acc = torch.empty((num_tokens, num_heads, num_kv_splits, d_pad), dtype=torch.float32, device=q.device)
    part_max = torch.empty((num_tokens, num_heads, num_kv_splits), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    _split_kv_attention_kernel[(num_tiles, num_kv_heads, num_kv_splits)](
        part_acc, part_max, part_sum, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, num_seqs,
        scale_log2, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), NUM_HEADS=num_heads, NUM_SPLITS=num_kv_splits, **common,
    )  # fmt: skip
    _merge_kv_splits_kernel[(num_tokens, num_heads)](
        out, part_acc, part_max, part_sum, query_start_loc, num_seqs, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_SPLITS=num_kv_splits, HEAD_DIM=head_dim, D_PAD=d_pad,
        num_warps=4 if d_pad <= 128 else 8,
    )  # fmt: skip
    return out
