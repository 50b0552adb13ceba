"""Triton (interpreted on CPU) and FlexAttention backends against the reference PyTorch backend.

Random paged caches (every slot filled with noise, shuffled block tables, prefixes shared between sequences),
mixed steps (prefill chunks over cached prefixes + decodes + empty padding sequences + padding tokens with slot
-1), head_dim 96 and 64, block sizes 16 and 32, sliding window on and off, GQA, fp32 plus looser fp16/bf16.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates our kernels (decoration picks the interpreter)

import pytest
import torch

from xgenmm.attention import AttentionMetadata, TorchReferenceBackend, get_attention_backend, store_kv

if "xgenmm.attention.triton_kernels" in sys.modules:  # imported earlier without the interpreter: re-decorate
    importlib.reload(sys.modules["xgenmm.attention.triton_kernels"])
from xgenmm.attention import triton_kernels  # noqa: E402
from xgenmm.attention.flex import FlexAttentionBackend  # noqa: E402
from xgenmm.attention.triton_backend import TritonBackend  # noqa: E402


class Step:
    """One random scheduler step over a paged cache, plus everything the reference needs."""

    def __init__(
        self,
        seqs: list[tuple[int, int]],  # (cached context length, new tokens) per sequence; (0, 0) = padding sequence
        *,
        num_heads: int = 4,
        num_kv_heads: int = 4,
        head_dim: int = 96,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        sliding_window: int | None = None,
        share_prefix_blocks: int = 0,  # sequences 0 and 1 share this many leading physical blocks
        padding_tokens: int = 0,  # extra rows after the last sequence's tokens (slot -1, owned by no sequence)
        seed: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.scale = 1.0 / math.sqrt(head_dim)
        blocks_needed = [(c + n + block_size - 1) // block_size for c, n in seqs]
        num_blocks = sum(blocks_needed) + 3
        max_blocks = max(max(blocks_needed), 1) + 1  # one trailing padding entry (0) per row
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
        next_free = 0
        for b, nb in enumerate(blocks_needed):
            for i in range(nb):
                if b == 1 and i < share_prefix_blocks:
                    tables[1, i] = tables[0, i]
                else:
                    tables[b, i] = perm[next_free]
                    next_free += 1
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, generator=gen).to(dtype)
        self.v_cache = torch.randn(shape, generator=gen).to(dtype)
        num_real = sum(n for _, n in seqs)
        total = num_real + padding_tokens
        self.q = torch.randn(total, num_heads, head_dim, generator=gen).to(dtype)
        self.k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
        self.v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
        slots, qsl = [], [0]
        for b, (ctx, n) in enumerate(seqs):
            for pos in range(ctx, ctx + n):
                slots.append(int(tables[b, pos // block_size]) * block_size + pos % block_size)
            qsl.append(qsl[-1] + n)
        slots += [-1] * padding_tokens
        self.num_real_tokens = num_real
        seq_lens = [c + n for c, n in seqs]
        ctx_lens = [c for c, _ in seqs]
        self.meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32),
            block_tables=tables,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(n for _, n in seqs),
            max_seq_len=max(seq_lens),
            block_size=block_size,
            sliding_window=sliding_window,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
            context_lens_cpu=ctx_lens,
        )

    def caches(self):
        return self.k_cache.clone(), self.v_cache.clone()

    def reference(self):
        """Reference output (fp32 math on upcast inputs) and the cache after the store."""
        kc, vc = self.k_cache.float(), self.v_cache.float()
        out = TorchReferenceBackend().forward(
            self.q.float(), self.k.float(), self.v.float(), (kc, vc), self.meta, self.scale
        )
        return out[: self.num_real_tokens], kc, vc

    def run(self, backend):
        kc, vc = self.caches()
        out = backend.forward(self.q, self.k, self.v, (kc, vc), self.meta, self.scale)
        return out[: self.num_real_tokens], kc, vc


# (context, new) per sequence: chunked prefill over a cached prefix, a fresh prefill, decodes, an empty padding
# sequence between real ones, a prefix-cache hit whose last token is recomputed.
MIXED = [(21, 19), (0, 13), (37, 1), (0, 0), (5, 1), (48, 1), (16, 4)]
DECODE = [(70, 1), (3, 1), (0, 0), (33, 1)]

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]} for {dtype}"


# ---------------------------------------------------------------- Triton (interpreted)


SMALL_TILES = triton_kernels.AttentionLaunchConfig(block_m=16, tile_n=16)  # several query tiles per prefill


@pytest.mark.parametrize(
    "head_dim,block_size,window,num_heads,num_kv_heads,config",
    [
        (96, 16, None, 2, 2, None),
        (64, 32, None, 2, 2, None),
        (96, 32, 9, 2, 2, SMALL_TILES),
        (64, 16, 20, 2, 1, None),
        (64, 16, None, 6, 2, SMALL_TILES),  # GQA group of 3, padded to 4 rows per token
    ],
)
def test_triton_unified_mixed_batch_matches_reference(head_dim, block_size, window, num_heads, num_kv_heads, config):
    step = Step(
        MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        sliding_window=window, share_prefix_blocks=1, padding_tokens=3, seed=head_dim + block_size,
    )  # fmt: skip
    want, kc_ref, vc_ref = step.reference()
    got, kc, vc = step.run(TritonBackend(num_kv_splits=1, launch_config=config))
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("splits,window", [(2, None), (4, None), (4, 24)])
def test_triton_split_kv_decode_matches_reference(splits, window):
    step = Step(DECODE, num_heads=2, num_kv_heads=2, head_dim=96, block_size=16, sliding_window=window, seed=splits)
    want, _, _ = step.reference()
    got, _, _ = step.run(TritonBackend(num_kv_splits=splits))
    assert_close(got, want, torch.float32)


def test_triton_split_kv_also_handles_prefill_rows():
    step = Step([(9, 5), (0, 0), (30, 1)], num_heads=2, num_kv_heads=1, head_dim=64, block_size=16, seed=7)
    want, _, _ = step.reference()
    got, _, _ = step.run(TritonBackend(num_kv_splits=4))
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision_close_to_fp32_reference(dtype):
    step = Step(MIXED[:3], num_heads=2, num_kv_heads=2, head_dim=96, block_size=16, dtype=dtype, seed=3)
    want, kc_ref, _ = step.reference()
    got, kc, _ = step.run(TritonBackend(num_kv_splits=1))
    assert got.dtype == dtype
    assert torch.equal(kc.float(), kc_ref)
    assert_close(got, want, dtype)
    got_split, _, _ = step.run(TritonBackend(num_kv_splits=2))
    assert_close(got_split, want, dtype)


def test_triton_padded_decode_batch_keeps_shapes_and_results():
    """A CUDA-graph-style padded decode: real rows match, padding sequences/tokens never touch the cache."""
    step = Step([(40, 1), (0, 0), (0, 0), (12, 1)], num_heads=2, num_kv_heads=2, head_dim=64, padding_tokens=2)
    want, kc_ref, vc_ref = step.reference()
    for splits in (1, 2):
        got, kc, vc = step.run(TritonBackend(num_kv_splits=splits))
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
        assert_close(got, want, torch.float32)


def test_store_kvcache_matches_store_kv_and_skips_negative_slots():
    step = Step(MIXED, num_heads=2, num_kv_heads=3, head_dim=96, block_size=16, padding_tokens=2, seed=11)
    qkv = torch.randn(step.k.shape[0], 3, 3, 96)  # strided k/v views, as split from a fused projection
    k, v = qkv[:, 1], qkv[:, 2]
    kc_ref, vc_ref = step.caches()
    store_kv(k, v, (kc_ref, vc_ref), step.meta.slot_mapping)
    kc, vc = step.caches()
    triton_kernels.store_kvcache(k, v, kc, vc, step.meta.slot_mapping)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert not torch.equal(kc, step.k_cache)  # something was written


def test_store_kvcache_casts_to_cache_dtype():
    step = Step([(0, 5)], num_heads=1, num_kv_heads=1, head_dim=64, dtype=torch.float16)
    k32, v32 = torch.randn(5, 1, 64), torch.randn(5, 1, 64)
    kc, vc = step.caches()
    triton_kernels.store_kvcache(k32, v32, kc, vc, step.meta.slot_mapping)
    kc_ref, vc_ref = step.caches()
    store_kv(k32, v32, (kc_ref, vc_ref), step.meta.slot_mapping)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_choose_num_kv_splits_only_for_long_sparse_decode():
    cpu = torch.device("cpu")
    assert triton_kernels.choose_num_kv_splits(1, 32, 1, 4096, cpu) == 8
    assert triton_kernels.choose_num_kv_splits(1, 32, 1, 100, cpu) == 1  # short context
    assert triton_kernels.choose_num_kv_splits(64, 32, 1, 4096, cpu) == 1  # GPU already full
    assert triton_kernels.choose_num_kv_splits(1, 32, 7, 4096, cpu) == 1  # prefill rows present
    assert triton_kernels.choose_num_kv_splits(2, 8, 1, 2048, cpu) == 8


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    from xgenmm.attention.triton_backend import AttentionBackendUnavailableError

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    step = Step([(0, 3)], num_heads=1, num_kv_heads=1, head_dim=64)
    with pytest.raises(AttentionBackendUnavailableError, match="CUDA"):
        step.run(TritonBackend())


# ---------------------------------------------------------------- FlexAttention (eager, CPU)


@pytest.mark.parametrize(
    "head_dim,block_size,window,num_kv_heads,kv_layout",
    [
        (96, 16, None, 4, "paged"),
        (64, 32, None, 2, "paged"),
        (96, 32, 9, 4, "paged"),
        (96, 16, None, 2, "gathered"),
        (64, 16, 20, 4, "gathered"),
    ],
)
def test_flex_mixed_batch_matches_reference(head_dim, block_size, window, num_kv_heads, kv_layout):
    step = Step(
        MIXED, num_heads=4, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        sliding_window=window, share_prefix_blocks=1, padding_tokens=2, seed=head_dim * block_size,
    )  # fmt: skip
    want, kc_ref, vc_ref = step.reference()
    got, kc, vc = step.run(FlexAttentionBackend(kv_layout=kv_layout))
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("kv_layout,window", [("paged", None), ("paged", 7), ("gathered", 20)])
def test_flex_block_mask_lists_exactly_the_visible_pages(kv_layout, window):
    """Eager flex only evaluates mask_mod; compiled kernels trust the BlockMask, so check it against mask_mod:
    every page with a visible key is listed once, as "full" only when every real row sees all of its keys."""
    step = Step(MIXED, num_heads=2, num_kv_heads=2, head_dim=64, block_size=16, sliding_window=window,
                share_prefix_blocks=1, seed=4)  # fmt: skip
    backend = FlexAttentionBackend(kv_layout=kv_layout, q_block_size=8)  # several row tiles per sequence
    step.run(backend)
    mask = backend._plan.block_mask
    bs, qb = 16, 8
    num_seqs, _, num_rows, num_pages = mask.kv_indices.shape
    lq = step.meta.max_query_len
    b = torch.arange(num_seqs)[:, None, None]
    q_idx = torch.arange(lq)[None, :, None]
    kv_idx = torch.arange(num_pages * bs)[None, None, :]
    dense = mask.mask_mod(b, torch.zeros_like(b), q_idx, kv_idx)  # [B, Lq, pages*bs]
    q_len = step.meta.query_start_loc.diff()
    row_valid = torch.arange(lq)[None, :] < q_len[:, None]
    for bi in range(num_seqs):
        for r in range(num_rows):
            rows = slice(r * qb, min((r + 1) * qb, lq))
            n_part, n_full = int(mask.kv_num_blocks[bi, 0, r]), int(mask.full_kv_num_blocks[bi, 0, r])
            partial = mask.kv_indices[bi, 0, r, :n_part].tolist()
            full = mask.full_kv_indices[bi, 0, r, :n_full].tolist()
            assert len(set(partial + full)) == n_part + n_full
            tile = dense[bi, rows].view(-1, num_pages, bs)  # [rows, pages, bs]
            visible_pages = set(torch.nonzero(tile.any(dim=(0, 2))).flatten().tolist())
            assert set(partial + full) == visible_pages
            real = tile[row_valid[bi, rows]]
            for page in full:
                assert bool(real[:, page].all()), (bi, r, page)


def test_flex_head_dim_96_padded_to_128_keeps_scale():
    step = Step(MIXED, num_heads=2, num_kv_heads=2, head_dim=96, block_size=16, seed=5)
    want, _, _ = step.reference()
    backend = FlexAttentionBackend(pad_head_dim=True)
    got, _, _ = step.run(backend)
    assert_close(got, want, torch.float32)


def test_flex_pure_decode_and_block_mask_reuse_across_layers():
    step = Step(DECODE, num_heads=4, num_kv_heads=4, head_dim=96, block_size=16, seed=9)
    want, _, _ = step.reference()
    backend = FlexAttentionBackend()
    got1, _, _ = step.run(backend)
    got2, _, _ = step.run(backend)  # second "layer" of the same step reuses the step's mask
    assert_close(got1, want, torch.float32)
    assert torch.equal(got1, got2)


def test_get_attention_backend_names():
    assert isinstance(get_attention_backend("flex", "cpu"), FlexAttentionBackend)
    assert isinstance(get_attention_backend("triton", "cpu"), TritonBackend)


# ---------------------------------------------------------------- the reference itself


def explicit_attention(step: Step, group: int) -> torch.Tensor:
    """float64 softmax(q k^T) v per token over its sequence's positions, written out: the reference's own oracle."""
    kc, vc = step.k_cache.double().clone(), step.v_cache.double().clone()
    store_kv(step.k.double(), step.v.double(), (kc, vc), step.meta.slot_mapping)
    meta, out = step.meta, []
    bs, window = meta.block_size, meta.sliding_window
    for b, (start, end) in enumerate(zip(meta.query_start_loc_cpu[:-1], meta.query_start_loc_cpu[1:])):
        for row, pos in zip(range(start, end), range(meta.context_lens_cpu[b], meta.seq_lens_cpu[b])):
            first = 0 if window is None else max(0, pos - window + 1)
            slots = [int(meta.block_tables[b, p // bs]) * bs + p % bs for p in range(first, pos + 1)]
            keys = kc.view(-1, *kc.shape[2:])[slots].repeat_interleave(group, dim=1)  # [n, H, D]
            values = vc.view(-1, *vc.shape[2:])[slots].repeat_interleave(group, dim=1)
            weights = torch.einsum("hd,nhd->hn", step.q[row].double(), keys).mul(step.scale).softmax(-1)
            out.append(torch.einsum("hn,nhd->hd", weights, values))
    return torch.stack(out)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("seqs", [MIXED, [(0, 40)], [(0, 33), (0, 5), (12, 12)]])
def test_reference_prefill_and_decode_match_explicit_softmax(seqs, window):
    """Fresh prompts take SDPA's causal kernel, cached contexts an explicit mask, decodes the padded batch: all three
    must equal attention written out in float64."""
    step = Step(seqs, num_heads=4, num_kv_heads=2, sliding_window=window, seed=3)
    got, _, _ = step.run(TorchReferenceBackend())
    want = explicit_attention(step, group=2)
    assert (got.double() - want).abs().max().item() < 2e-5
