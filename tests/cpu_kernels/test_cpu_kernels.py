"""Our C++ CPU kernels (`xgenmm.cpu_kernels`): the batch-invariant bf16 linear and the in-place paged attention.

Checked against float32 math (linear: within one bf16 rounding of the output; attention: against the reference
backend's gather + SDPA, to float32 rounding in float32 and no further from float32 than the reference in bf16), on
mixed varlen batches (decode rows, chunked-prefill chunks, whole prompts, padding sequences), GQA, a sliding window,
and every row computed alone vs in a batch (bit-identical)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xgenmm import cpu_kernels
from xgenmm.attention import AttentionMetadata, TorchReferenceBackend, get_attention_backend

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"CPU kernels unavailable here: {cpu_kernels.unavailable_reason()}")


@pytest.mark.parametrize("m,k,n", [(1, 3072, 96), (3, 4304, 37), (7, 100, 50), (16, 64, 130), (70, 96, 20)])
def test_linear_bf16_within_one_rounding_of_float32(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    exact = F.linear(x.float(), w.float(), b.float())
    for bias in (b, None):
        y = torch.ops.xgenmm_cpu.linear_bf16(x, w, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        ref = exact if bias is not None else exact - b.float()
        ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)  # bf16 spacing at each output
        assert bool(((y.float() - ref).abs() <= ulp * 0.5 + 1e-5 * ref.abs().max()).all())
    assert torch.ops.xgenmm_cpu.linear_bf16(x.view(1, m, k), w, b).shape == (1, m, n)


def test_linear_bf16_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1152, generator=g).bfloat16()
    w = (torch.randn(200, 1152, generator=g) * 0.03).bfloat16()
    full = torch.ops.xgenmm_cpu.linear_bf16(x, w, None)
    for rows in (slice(0, 1), slice(5, 6), slice(3, 11), slice(100, 300)):
        assert torch.equal(torch.ops.xgenmm_cpu.linear_bf16(x[rows], w, None), full[rows])


@pytest.mark.parametrize("m,k,n", [(1, 3072, 96), (7, 4304, 37), (61, 100, 50), (130, 97, 33), (3, 512, 1000)])
def test_packed_linear_bf16_within_one_rounding_and_rows_batch_invariant(m, k, n):
    g = torch.Generator().manual_seed(m * 7 + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    packed = torch.ops.xgenmm_cpu.pack_bf16_weight(w)
    assert torch.equal(torch.ops.xgenmm_cpu.unpack_bf16_weight(packed, n, k), w)
    y = torch.ops.xgenmm_cpu.linear_bf16_packed(x, packed, b, n)
    ref = F.linear(x.float(), w.float(), b.float())
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    assert bool(((y.float() - ref).abs() <= ulp * 0.5 + 1e-5 * ref.abs().max()).all())
    for i in range(0, m, max(1, m // 4)):  # every row alone equals itself inside the batch, bit for bit
        assert torch.equal(torch.ops.xgenmm_cpu.linear_bf16_packed(x[i : i + 1], packed, b, n)[0], y[i])


def test_packed_linear_module_keeps_a_plain_state_dict():
    from torch import nn

    from xgenmm.model.cpu_linear import PackedBf16Linear, use_packed_bf16_linears

    net = nn.Sequential(nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 8, bias=False)).bfloat16()
    plain = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 48).bfloat16()
    assert use_packed_bf16_linears(net) == 2 and isinstance(net[0], PackedBf16Linear)
    assert net.state_dict().keys() == plain.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in plain.items())
    ref = F.linear(F.relu(F.linear(x.float(), plain["0.weight"].float(), plain["0.bias"].float()).bfloat16()).float(),
                   plain["2.weight"].float())
    torch.testing.assert_close(net(x).float(), ref, rtol=2e-2, atol=2e-2)
    other = {k: torch.randn_like(v.float()).bfloat16() for k, v in plain.items()}
    net.load_state_dict(other)
    assert torch.equal(net[2].weight, other["2.weight"]) and torch.equal(net[0].bias, other["0.bias"])


def test_linear_bf16_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.xgenmm_cpu.linear_bf16(torch.randn(2, 8), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.xgenmm_cpu.linear_bf16(torch.randn(2, 9).bfloat16(), torch.randn(4, 8).bfloat16(), None)


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


def _paged(q, caches, meta, scale, window=0):
    out = torch.empty_like(q)
    torch.ops.xgenmm_cpu.paged_attention(out, q, caches[0], caches[1], meta.block_tables, meta.query_start_loc,
                                         meta.seq_lens, scale, window)
    return out


def _reference(q, caches, meta, scale):
    t, kv_heads, d = q.shape[0], caches[0].shape[2], q.shape[2]
    empty = torch.zeros(t, kv_heads, d, dtype=q.dtype)
    return TorchReferenceBackend().forward(q, empty, empty, caches, meta, scale)


# decode rows, a decode next to a long context, a chunk after a cached prefix, a whole prompt, padding (no rows)
MIXED = ([1, 7, 40, 1, 0, 23], [37, 7, 100, 300, 0, 60])


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 96), (8, 2, 64), (4, 4, 16), (2, 1, 128)])
def test_paged_attention_float32_matches_reference(heads, kv_heads, head_dim):
    q, caches, tables = _case(torch.float32, heads, kv_heads, head_dim, *MIXED)
    meta = _meta(*MIXED, 16, tables)
    out, ref = _paged(q, caches, meta, head_dim**-0.5), _reference(q, caches, meta, head_dim**-0.5)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)


def test_paged_attention_bf16_no_further_from_float32_than_the_reference():
    q, caches, tables = _case(torch.bfloat16, 4, 4, 96, *MIXED)
    meta = _meta(*MIXED, 16, tables)
    exact = _reference(q.float(), tuple(c.float() for c in caches), meta, 96**-0.5)
    out, ref = _paged(q, caches, meta, 96**-0.5), _reference(q, caches, meta, 96**-0.5)
    assert out.dtype == torch.bfloat16
    ours_err, ref_err = (out.float() - exact).abs(), (ref.float() - exact).abs()
    assert float(ours_err.max()) <= 1.01 * float(ref_err.max()) and float(ours_err.mean()) <= 1.01 * float(ref_err.mean())


def test_paged_attention_sliding_window_matches_reference():
    q, caches, tables = _case(torch.float32, 4, 4, 96, *MIXED, seed=1)
    meta = _meta(*MIXED, 16, tables, window=9)
    torch.testing.assert_close(_paged(q, caches, meta, 0.1, window=9), _reference(q, caches, meta, 0.1),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_rows_do_not_depend_on_the_batch(dtype):
    """A sequence alone gives bit-identical rows to the same sequence inside a mixed batch, and a decode row equals
    the last row of the same positions computed as a prefill chunk (what preemption by recompute does)."""
    q, caches, tables = _case(dtype, 4, 4, 96, *MIXED, seed=2)
    batch = _paged(q, caches, _meta(*MIXED, 16, tables), 0.1)
    qsl = _meta(*MIXED, 16, tables).query_start_loc_cpu
    for b in (0, 2, 3, 5):
        rows = slice(qsl[b], qsl[b + 1])
        alone = _paged(q[rows].contiguous(), caches, _meta([MIXED[0][b]], [MIXED[1][b]], 16, tables[b : b + 1]), 0.1)
        assert torch.equal(alone, batch[rows])
    # sequence 2 as a decode of its last token
    decode = _paged(q[qsl[3] - 1 : qsl[3]].contiguous(), caches, _meta([1], [100], 16, tables[2:3]), 0.1)
    assert torch.equal(decode, batch[qsl[3] - 1 : qsl[3]])


def test_cpu_paged_backend_is_the_cpu_default_and_stores_kv():
    backend = get_attention_backend(None, "cpu")
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


def test_built_library_is_cached_on_disk():
    from xgenmm.cpu_kernels import build

    libraries = list((build.cache_dir() / build.build_key()).glob("*.so"))
    assert len(libraries) == 1  # the next process loads this file instead of compiling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_the_reference_scatter(dtype):
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
    torch.ops.xgenmm_cpu.store_kv(k, v, got_k, got_v, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.xgenmm_cpu.store_kv(k, v, got_k, got_v, torch.tensor([0, 1, 2, 3, 4, 5, 24]))


def test_hugepage_tensors_are_ordinary_tensors_on_2mib_aligned_memory():
    """Packed weights, the LM head and the CPU KV cache live in `empty_hugepages` memory: 2 MiB-aligned (so the kernel
    can back it with huge pages), usable like any tensor, and unmapped when dropped."""
    import gc

    from xgenmm.cpu_kernels import empty_hugepages, to_hugepages

    big = empty_hugepages((3, 1000, 1000), torch.bfloat16)
    assert big.shape == (3, 1000, 1000) and big.dtype == torch.bfloat16 and big.is_contiguous()
    assert big.data_ptr() % (2 << 20) == 0
    src = torch.randn(1000, 1500)
    copy = to_hugepages(src)
    assert torch.equal(copy, src) and copy.data_ptr() != src.data_ptr() and copy.data_ptr() % (2 << 20) == 0
    small = empty_hugepages((4, 4), torch.float32)  # under 2 MiB: ordinary memory
    assert small.shape == (4, 4)
    packed = torch.ops.xgenmm_cpu.pack_bf16_weight(torch.randn(2048, 1024).bfloat16())
    assert packed.data_ptr() % (2 << 20) == 0

    def mapped_kib() -> int:
        return sum(int(line.split()[1]) for line in open("/proc/self/smaps") if line.startswith("Rss:"))

    before = mapped_kib()
    block = empty_hugepages((64 << 20,), torch.uint8).fill_(1)  # 64 MiB, touched
    assert mapped_kib() - before >= 60 << 10
    del block
    gc.collect()
    assert mapped_kib() - before < 8 << 10
