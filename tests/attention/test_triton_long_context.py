"""The Triton split-KV decode at long context, under the interpreter (what the GPU check relies on): >= 4096 keys
split 16 ways, in float32 and in bf16 (inputs bf16, compared with float32 math on the same rounded values)."""

from __future__ import annotations

import importlib
import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates our kernels (decoration picks the interpreter)

import pytest
import torch

pytest.importorskip("triton")

from xgenmm.attention import AttentionMetadata, TorchReferenceBackend  # noqa: E402

if "xgenmm.attention.triton_kernels" in sys.modules:  # imported earlier without the interpreter: re-decorate
    importlib.reload(sys.modules["xgenmm.attention.triton_kernels"])
from xgenmm.attention.triton_backend import TritonBackend  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2.5e-2}


def _long_decode(dtype, contexts=(4100, 4607), heads=2, head_dim=96, block_size=16, seed=0):
    """Decode rows over long paged contexts (shuffled blocks), plus a short decode row."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [*contexts, 37]
    need = [(c + 1 + block_size - 1) // block_size for c in seqs]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    used = 0
    for b, nb in enumerate(need):
        tables[b, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
    shape = (num_blocks, block_size, heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(len(seqs), heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(len(seqs), heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(len(seqs), heads, head_dim, generator=gen).to(dtype)
    slots = [int(tables[b, c // block_size]) * block_size + c % block_size for b, c in enumerate(seqs)]
    qsl = list(range(len(seqs) + 1))
    seq_lens = [c + 1 for c in seqs]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        context_lens=torch.tensor(list(seqs), dtype=torch.int32), block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64), max_query_len=1, max_seq_len=max(seq_lens),
        block_size=block_size, query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, context_lens_cpu=list(seqs))
    return q, k, v, (k_cache, v_cache), meta, 1.0 / math.sqrt(head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_decode_16_splits_over_4096_keys(dtype):
    q, k, v, (kc, vc), meta, scale = _long_decode(dtype)
    assert meta.max_seq_len >= 4096
    want = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), (kc.float(), vc.float()), meta, scale)
    backend = TritonBackend(num_kv_splits=16)
    assert backend.num_kv_splits_for(meta, q.shape[1], q.device) == 16
    got = backend.forward(q, k, v, (kc.clone(), vc.clone()), meta, scale)
    assert got.dtype == dtype
    err = float((got.float() - want).abs().max())
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]}"
    # one split over the same keys agrees too (the merge of 16 partial softmaxes is exact up to rounding)
    unsplit = TritonBackend(num_kv_splits=1).forward(q, k, v, (kc.clone(), vc.clone()), meta, scale)
    assert float((got.float() - unsplit.float()).abs().max()) <= TOL[dtype]
