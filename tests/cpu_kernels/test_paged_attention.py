"""Paged attention read in place (`attention/cpu_paged.py`), in each kernel library built here: the AVX-512 BF16 one
(`torch.ops.xgenmm_cpu`) and the AVX2 one (`torch.ops.xgenmm_avx2`).

Checked against the reference backend's gather + SDPA (to float32 rounding in float32, no further from float32 than
the reference in bf16) on mixed varlen batches (decode rows, chunked-prefill chunks, whole prompts, padding
sequences), GQA, a sliding window; every row computed alone vs in a batch, and a decode row vs the same position
inside a prefill chunk, bit-identical (fuzzed); malformed metadata refused with a typed error, not read out of bounds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from xgenmm import cpu_kernels
from xgenmm.attention import AttentionMetadata, TorchReferenceBackend, get_attention_backend
from xgenmm.cpu_kernels.build import AVX2_INT8, AVX512_BF16, load

LIBRARIES = [pytest.param(ns, marks=pytest.mark.skipif(not load(lib), reason=f"{lib.title} not built here"), id=ns)
             for ns, lib in (("xgenmm_cpu", AVX512_BF16), ("xgenmm_avx2", AVX2_INT8))]


def _ops(ns: str):
    return getattr(torch.ops, ns)


def _meta(q_lens, seq_lens, block_size, tables, window=None):
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    ctx = [s - q for s, q in zip(seq_lens, q_lens)]
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        context_lens=torch.tensor(ctx, dtype=torch.int32), block_tables=tables,
        slot_mapping=torch.full((qsl[-1],), -1, dtype=torch.int64), max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), block_size=block_size, sliding_window=window, query_start_loc_cpu=qsl,
        seq_lens_cpu=list(seq_lens), context_lens_cpu=ctx)


def _case(dtype, heads, kv_heads, head_dim, q_lens, seq_lens, seed=0, block_size=16, num_blocks=80):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    max_blocks = -(-max(seq_lens) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in q_lens]).int()
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(dtype)
    return q, (k_cache, v_cache), tables


def _paged(ns, q, caches, meta, scale, window=0):
    out = torch.empty_like(q)
    _ops(ns).paged_attention(out, q, caches[0], caches[1], meta.block_tables, meta.query_start_loc, meta.seq_lens,
                             scale, window)
    return out


def _reference(q, caches, meta, scale):
    t, kv_heads, d = q.shape[0], caches[0].shape[2], q.shape[2]
    empty = torch.zeros(t, kv_heads, d, dtype=q.dtype)
    return TorchReferenceBackend().forward(q, empty, empty, caches, meta, scale)


# decode rows, a decode next to a long context, a chunk after a cached prefix, a whole prompt, padding (no rows)
MIXED = ([1, 7, 40, 1, 0, 23], [37, 7, 100, 300, 0, 60])


@pytest.mark.parametrize("ns", LIBRARIES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 96), (8, 2, 64), (4, 4, 16), (2, 1, 128)])
def test_paged_attention_float32_matches_reference(ns, heads, kv_heads, head_dim):
    q, caches, tables = _case(torch.float32, heads, kv_heads, head_dim, *MIXED)
    meta = _meta(*MIXED, 16, tables)
    out, ref = _paged(ns, q, caches, meta, head_dim**-0.5), _reference(q, caches, meta, head_dim**-0.5)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("ns", LIBRARIES)
def test_paged_attention_bf16_no_further_from_float32_than_the_reference(ns):
    q, caches, tables = _case(torch.bfloat16, 4, 4, 96, *MIXED)
    meta = _meta(*MIXED, 16, tables)
    exact = _reference(q.float(), tuple(c.float() for c in caches), meta, 96**-0.5)
    out, ref = _paged(ns, q, caches, meta, 96**-0.5), _reference(q, caches, meta, 96**-0.5)
    assert out.dtype == torch.bfloat16
    ours_err, ref_err = (out.float() - exact).abs(), (ref.float() - exact).abs()
    assert float(ours_err.max()) <= 1.01 * float(ref_err.max()) and float(ours_err.mean()) <= 1.01 * float(ref_err.mean())


@pytest.mark.parametrize("ns", LIBRARIES)
def test_paged_attention_sliding_window_matches_reference(ns):
    q, caches, tables = _case(torch.float32, 4, 4, 96, *MIXED, seed=1)
    meta = _meta(*MIXED, 16, tables, window=9)
    torch.testing.assert_close(_paged(ns, q, caches, meta, 0.1, window=9), _reference(q, caches, meta, 0.1),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("ns", LIBRARIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_rows_do_not_depend_on_the_batch(ns, dtype):
    """A sequence alone gives bit-identical rows to the same sequence inside a mixed batch, and a decode row equals
    the last row of the same positions computed as a prefill chunk (what preemption by recompute does)."""
    q, caches, tables = _case(dtype, 4, 4, 96, *MIXED, seed=2)
    batch = _paged(ns, q, caches, _meta(*MIXED, 16, tables), 0.1)
    qsl = _meta(*MIXED, 16, tables).query_start_loc_cpu
    for b in (0, 2, 3, 5):
        rows = slice(qsl[b], qsl[b + 1])
        alone = _paged(ns, q[rows].contiguous(), caches, _meta([MIXED[0][b]], [MIXED[1][b]], 16, tables[b : b + 1]), 0.1)
        assert torch.equal(alone, batch[rows])
    # sequence 2 as a decode of its last token
    decode = _paged(ns, q[qsl[3] - 1 : qsl[3]].contiguous(), caches, _meta([1], [100], 16, tables[2:3]), 0.1)
    assert torch.equal(decode, batch[qsl[3] - 1 : qsl[3]])


@pytest.mark.parametrize("ns", LIBRARIES)
@settings(max_examples=25, deadline=None)
@given(seq_len=st.integers(1, 300), split=st.integers(0, 299), window=st.sampled_from([0, 0, 5, 130]),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_any_position_is_the_same_bits_as_decode_and_inside_a_chunk(ns, seq_len, split, window, bf16, seed):
    """Fuzzed: a prompt of seq_len tokens computed as one chunk after a cached prefix of `split` tokens gives, for
    every row, the bits of that position computed as a decode row alone and as a decode row beside other work."""
    split = min(split, seq_len - 1)
    dtype = torch.bfloat16 if bf16 else torch.float32
    q, caches, tables = _case(dtype, 2, 2, 96, [seq_len - split], [seq_len], seed=seed, num_blocks=24)
    chunk = _paged(ns, q, caches, _meta([seq_len - split], [seq_len], 16, tables, window or None), 0.1, window)
    for row in sorted({0, (seq_len - split) // 2, seq_len - split - 1}):
        pos = split + row
        alone = _paged(ns, q[row : row + 1].contiguous(), caches, _meta([1], [pos + 1], 16, tables, window or None),
                       0.1, window)
        assert torch.equal(alone, chunk[row : row + 1])
        other = torch.randn(3, 2, 96, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        other_table = torch.tensor([[5, 2, 7]], dtype=torch.int32)  # 40 keys in 3 blocks of the same cache
        width = max(3, tables.shape[1])
        both_tables = torch.cat([F.pad(other_table, (0, width - 3)), F.pad(tables, (0, width - tables.shape[1]))])
        batched = _paged(ns, torch.cat([other, q[row : row + 1]]), caches,
                         _meta([3, 1], [40, pos + 1], 16, both_tables, window or None), 0.1, window)
        assert torch.equal(batched[3:], chunk[row : row + 1])


@pytest.mark.parametrize("ns", LIBRARIES)
def test_malformed_metadata_is_refused_not_read_out_of_bounds(ns):
    q, caches, tables = _case(torch.float32, 2, 2, 96, [1], [40], num_blocks=8)
    meta = _meta([1], [40], 16, tables)
    bad_block = tables.clone()
    bad_block[0, 1] = 8  # one past the cache
    with pytest.raises(RuntimeError, match="outside the cache"):
        _paged(ns, q, caches, _meta([1], [40], 16, bad_block), 0.1)
    with pytest.raises(RuntimeError, match="longer than its block table"):
        _paged(ns, q, caches, _meta([1], [60], 16, tables), 0.1)
    with pytest.raises(RuntimeError, match="more query rows than context"):
        _paged(ns, torch.randn(5, 2, 96), caches, _meta([5], [4], 16, tables), 0.1)
    with pytest.raises(RuntimeError, match="share one dtype"):
        _paged(ns, q.bfloat16(), caches, meta, 0.1)


def test_cpu_paged_backend_is_the_cpu_default_where_a_library_is_built_and_stores_kv():
    backend = get_attention_backend(None, "cpu")
    if not (load(AVX512_BF16) or load(AVX2_INT8)):
        assert backend.name == "torch"
        return
    assert backend.name == "cpu_paged"
    q, caches, tables = _case(torch.float32, 4, 4, 16, [3], [3], seed=3)
    meta = _meta([3], [3], 16, tables)
    meta.slot_mapping = tables[0, 0].long() * 16 + torch.arange(3)
    k = torch.randn(3, 4, 16)
    v = torch.randn(3, 4, 16)
    out = backend.forward(q, k, v, caches, meta, 0.25)
    assert torch.equal(caches[0][tables[0, 0], :3], k) and torch.equal(caches[1][tables[0, 0], :3], v)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         scale=0.25).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("ns", LIBRARIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_the_reference_scatter(ns, dtype):
    """The paged backend's one-call KV store writes what the reference `store_kv` writes: strided k / v views of a
    qkv projection, padding slots (-1) skipped, every other slot untouched; a slot past the cache is an error."""
    from xgenmm.attention.base import store_kv

    g = torch.Generator().manual_seed(5)
    blocks, block_size, hkv, d, t = 6, 4, 2, 32, 7
    qkv = torch.randn(t, 4 * d + 2 * hkv * d, generator=g).to(dtype)
    _, k, v = qkv.split((4 * d, hkv * d, hkv * d), dim=-1)
    k, v = k.view(t, hkv, d), v.view(t, hkv, d)
    slots = torch.tensor([3, 9, -1, 0, 23, -1, 12])
    want_k, want_v = (torch.randn(blocks, block_size, hkv, d, generator=g).to(dtype) for _ in range(2))
    got_k, got_v = want_k.clone(), want_v.clone()
    store_kv(k, v, (want_k, want_v), slots)
    _ops(ns).store_kv(k, v, got_k, got_v, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    with pytest.raises(RuntimeError, match="outside the cache"):
        _ops(ns).store_kv(k, v, got_k, got_v, torch.tensor([0, 1, 2, 3, 4, 5, 24]))
