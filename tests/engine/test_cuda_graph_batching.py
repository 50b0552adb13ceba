"""The CUDA-graph decode path's device-agnostic half, on CPU: buckets, the decision of when a step replays a graph,
static-buffer capacity, and padded static decode batches giving the eager step's logits and KV writes (reference
backend, and the Triton backend + fused kernels under TRITON_INTERPRET=1, exactly what a graph would replay)."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates any kernel this module runs

import pytest
import torch

for _name in ("xgenmm.attention.triton_kernels", "xgenmm.model.fused_ops"):
    if _name in sys.modules:  # imported earlier without the interpreter: re-decorate
        importlib.reload(sys.modules[_name])

from xgenmm.attention import TorchReferenceBackend  # noqa: E402
from xgenmm.attention.triton_backend import TritonBackend  # noqa: E402
from xgenmm.checkpoint import load_model  # noqa: E402
from xgenmm.engine import cuda_graphs as cg  # noqa: E402
from xgenmm.engine.block_manager import BlockManager  # noqa: E402
from xgenmm.engine.model_runner import ModelRunner, StepBatch  # noqa: E402
from xgenmm.engine.sequence import Sequence  # noqa: E402
from xgenmm.multimodal.spans import ImageSpan  # noqa: E402

BS = 16


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, "cpu", "float32")


# ---- buckets -------------------------------------------------------------------------------------------------


def test_decode_buckets():
    assert cg.decode_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert cg.decode_buckets(20) == [1, 2, 4, 8, 16, 20]  # max_num_seqs itself is always a bucket
    assert cg.decode_buckets(1) == [1]
    assert cg.decode_buckets(3) == [1, 2, 3]
    big = cg.decode_buckets(256)
    assert len(big) == 35 and big[:5] == [1, 2, 4, 8, 16] and big[-1] == 256
    assert all(b - a == 8 for a, b in zip(big[3:], big[4:]))
    with pytest.raises(ValueError, match="max_num_seqs"):
        cg.decode_buckets(0)


def test_bucket_for_picks_the_smallest_bucket_that_fits():
    buckets = cg.decode_buckets(64)
    assert [cg.bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 8, 9, 17, 63, 64)] == [1, 2, 4, 4, 8, 8, 16, 24, 64, 64]
    assert cg.bucket_for(65, buckets) is None


# ---- helpers -------------------------------------------------------------------------------------------------


def _decode_seqs(bm: BlockManager, contexts: list[int], seed: int = 0, vocab: int = 32000) -> list[Sequence]:
    """Sequences with `context` tokens in the cache and one more token to compute (a decode step)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i, ctx in enumerate(contexts):
        seq = Sequence(f"r{seed}-{i}", torch.randint(0, vocab, (ctx + 1,), generator=gen).tolist(), max_tokens=None)
        assert bm.allocate_slots(seq, ctx + 1)
        seqs.append(seq)
    return seqs


def _prefill(runner: ModelRunner, seqs: list[Sequence]) -> None:
    runner.execute(runner.build_batch([(s, s.num_tokens - 1) for s in seqs], {}))
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1


def _snapshot(runner: ModelRunner) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k.clone(), v.clone()) for k, v in runner.kv_caches]


def _restore(runner: ModelRunner, snap) -> None:
    for (k, v), (k0, v0) in zip(runner.kv_caches, snap):
        k.copy_(k0)
        v.copy_(v0)


# ---- the decision --------------------------------------------------------------------------------------------


def test_cuda_graph_chosen_only_for_pure_decode_on_cuda_with_a_capturable_backend():
    bm = BlockManager(64, BS)
    seqs = _decode_seqs(bm, [5, 40, 17])
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1
    decode = [(s, 1) for s in seqs]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    triton, ref = TritonBackend(), TorchReferenceBackend()
    ok = dict(enabled=True, device=cuda, backend=triton, scheduled=decode, max_batch=8, max_blocks=256)
    assert cg.should_use_cuda_graph(**ok)
    assert cg.cuda_graph_blocker(**ok) is None
    assert cg.cuda_graph_blocker(**{**ok, "device": "cuda:0"}) is None

    assert cg.cuda_graph_blocker(**{**ok, "enabled": False}) == "CUDA graphs disabled"
    assert cg.cuda_graph_blocker(**{**ok, "device": cpu}) == "not on CUDA"
    assert "not capturable" in cg.cuda_graph_blocker(**{**ok, "backend": ref})
    assert cg.cuda_graph_blocker(**{**ok, "scheduled": []}) == cg.EMPTY_STEP
    assert cg.cuda_graph_blocker(**{**ok, "max_batch": 2}) == cg.BATCH_TOO_LARGE
    assert cg.cuda_graph_blocker(**{**ok, "max_blocks": 2}) == cg.TABLE_TOO_LONG  # 41 tokens need 3 blocks
    # a prefill chunk anywhere in the step (even a 2-token one) keeps the whole step eager
    seqs[1].num_computed_tokens -= 1
    assert cg.cuda_graph_blocker(**{**ok, "scheduled": [(seqs[0], 1), (seqs[1], 2), (seqs[2], 1)]}) == cg.NOT_PURE_DECODE
    # a one-token prefill chunk is decode-shaped (context + 1 token): it may replay ...
    assert cg.cuda_graph_blocker(**{**ok, "scheduled": [(seqs[1], 1)]}) is None
    # ... unless that token is an image position (its embedding comes from the vision tower)
    img = Sequence("img", [7] * 10 + [32012] * 6 + [9], image_spans=[ImageSpan(10, 6, "h", 0)], max_tokens=None)
    assert bm.allocate_slots(img, 17)
    for pos, want in ((9, None), (10, cg.IMAGE_ROW), (15, cg.IMAGE_ROW), (16, None)):
        img.num_computed_tokens = pos
        assert cg.cuda_graph_blocker(**{**ok, "scheduled": [(img, 1)]}) == want, pos
    # a backend can declare itself
    class Declared:
        name = "custom"
        supports_cuda_graphs = True

    assert cg.backend_supports_cuda_graphs(Declared()) and cg.backend_supports_cuda_graphs(triton)
    assert not cg.backend_supports_cuda_graphs(ref)


def test_runner_on_cpu_never_uses_graphs_and_keeps_the_eager_batch(tiny_model):
    runner = ModelRunner(tiny_model, torch.device("cpu"), torch.float32, BS, 32, "torch")
    assert runner.decode_graphs is None
    assert runner.cuda_graph_stats() == {"enabled": False, "reason": "not on CUDA"}
    bm = BlockManager(32, BS)
    seqs = _decode_seqs(bm, [3, 20])
    _prefill(runner, seqs)
    assert isinstance(runner.build_batch([(s, 1) for s in seqs], {}), StepBatch)
    with pytest.raises(RuntimeError, match="CUDA"):
        cg.DecodeGraphs(runner._decode_forward, cg.DecodeBuffers(4, 8, BS, "cpu"), [1, 2, 4], 64, 10)


# ---- static buffers ------------------------------------------------------------------------------------------


def test_block_table_capacity_covers_max_model_len(tiny_model):
    runner = ModelRunner(tiny_model, torch.device("cpu"), torch.float32, BS, 40, "torch", max_num_seqs=8,
                         max_model_len=100)  # fmt: skip
    assert runner.max_blocks_per_seq == 7  # ceil(100 / 16)
    bm = BlockManager(40, BS)
    (longest,) = _decode_seqs(bm, [99])  # position 99 = the last one max_model_len allows
    longest.num_computed_tokens = 99
    batch = runner.build_static_decode_batch([(longest, 1)])
    assert batch.meta.block_tables.shape == (1, 7)
    assert batch.meta.block_tables[0].tolist() == longest.block_table
    assert int(batch.meta.slot_mapping[0]) == longest.block_table[6] * BS + 99 % BS
    (too_long,) = _decode_seqs(bm, [112], seed=1)
    too_long.num_computed_tokens = 112
    with pytest.raises(ValueError, match=cg.TABLE_TOO_LONG):
        runner.build_static_decode_batch([(too_long, 1)])
    with pytest.raises(ValueError, match="cannot pad"):
        cg.DecodeBuffers(4, 7, BS, "cpu").load([(longest, 1)] * 3, bucket=2)


def test_static_batch_padding_rows_follow_the_backend_contract(tiny_model):
    runner = ModelRunner(tiny_model, torch.device("cpu"), torch.float32, BS, 64, "torch", max_num_seqs=16)
    bm = BlockManager(64, BS)
    seqs = _decode_seqs(bm, [3, 31, 16])
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1
    batch = runner.build_static_decode_batch([(s, 1) for s in seqs])
    assert (batch.bucket, batch.num_seqs) == (4, 3)
    m = batch.meta
    assert m.query_start_loc.tolist() == [0, 1, 2, 3, 3]  # the padding sequence has query length 0
    assert m.seq_lens.tolist() == [4, 32, 17, 0]
    assert m.context_lens.tolist() == [3, 31, 16, 0]
    assert m.slot_mapping[3].item() == -1 and m.slot_mapping[:3].tolist() == [
        s.block_table[p // BS] * BS + p % BS for s, p in zip(seqs, (3, 31, 16))
    ]
    assert batch.input_ids.tolist() == [s.token_ids[-1] for s in seqs] + [0]
    assert batch.positions.tolist() == [3, 31, 16, 0]
    assert m.max_query_len == 1 and m.max_seq_len == 32
    assert (m.query_start_loc_cpu, m.seq_lens_cpu, m.context_lens_cpu) == ([0, 1, 2, 3, 3], [4, 32, 17, 0], [3, 31, 16, 0])
    assert batch.logits_rows == [0, 1, 2] and batch.sample_seqs == seqs
    # a smaller step reusing the buffers leaves no stale rows behind
    batch2 = runner.build_static_decode_batch([(seqs[1], 1)], bucket=2)
    assert batch2.meta.query_start_loc.tolist() == [0, 1, 1] and batch2.meta.seq_lens.tolist() == [32, 0]
    assert batch2.meta.slot_mapping.tolist()[1] == -1


# ---- padded static batch == eager step -----------------------------------------------------------------------


def _compare_static_with_eager(runner: ModelRunner, seqs: list[Sequence], sched, bucket=None, atol=5e-6):
    snap = _snapshot(runner)
    eager = runner.execute(runner.build_batch(sched, {}))
    eager_cache = _snapshot(runner)
    _restore(runner, snap)
    batch = runner.build_static_decode_batch(sched, bucket=bucket)
    static = runner.execute(batch)
    assert static.shape == eager.shape and static.dtype == torch.float32
    torch.testing.assert_close(static, eager, atol=atol, rtol=1e-5)  # GEMMs over more rows: fp32 rounding only
    for (k, v), (ke, ve) in zip(runner.kv_caches, eager_cache):  # same slots written, padding rows wrote nothing
        torch.testing.assert_close(k, ke, atol=atol, rtol=1e-6)
        torch.testing.assert_close(v, ve, atol=atol, rtol=1e-6)
    return batch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_static_decode_batch_gives_the_eager_logits(tiny_model, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    runner = ModelRunner(tiny_model, torch.device("cpu"), torch.float32, BS, 128, "torch", max_num_seqs=16)
    bm = BlockManager(128, BS)
    n = int(torch.randint(1, 10, (1,), generator=gen))
    contexts = torch.randint(0, 70, (n,), generator=gen).tolist()
    seqs = _decode_seqs(bm, contexts, seed=seed)
    _prefill(runner, [s for s in seqs if s.num_tokens > 1])
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1
    for step in range(2):  # two decode steps, the bucket padding changing as nothing else does
        sched = [(s, 1) for s in seqs]
        batch = _compare_static_with_eager(runner, seqs, sched)
        assert batch.bucket == cg.bucket_for(n, cg.decode_buckets(16))
        for s in seqs:
            s.num_computed_tokens += 1
            s.append_token(1000 + step)
            assert bm.allocate_slots(s, 1)


def test_padded_batch_with_a_larger_bucket_and_unsampled_rows(tiny_model):
    runner = ModelRunner(tiny_model, torch.device("cpu"), torch.float32, BS, 64, "torch", max_num_seqs=32)
    bm = BlockManager(64, BS)
    seqs = _decode_seqs(bm, [20, 33, 7])
    _prefill(runner, seqs)
    # seqs[1] computes one token of a longer remainder (a 1-token prefill chunk): it needs no logits
    seqs[1].num_computed_tokens -= 2
    sched = [(s, 1) for s in seqs]
    batch = _compare_static_with_eager(runner, seqs, sched, bucket=32)
    assert batch.bucket == 32 and batch.logits_rows == [0, 2] and batch.sample_seqs == [seqs[0], seqs[2]]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # padding rows hold garbage, unread
def test_static_batch_through_triton_backend_and_fused_kernels_matches_eager_reference(tiny_model):
    """What a captured graph replays (Triton paged attention + fused small ops over the padded buffers), run
    eagerly in the interpreter, against the plain reference step."""
    ref = ModelRunner(tiny_model, torch.device("cpu"), torch.float32, BS, 64, "torch", max_num_seqs=8)
    tri = ModelRunner(tiny_model, torch.device("cpu"), torch.float32, BS, 64, TritonBackend(), max_num_seqs=8)
    bm = BlockManager(64, BS)
    seqs = _decode_seqs(bm, [9, 40, 16, 0, 25], seed=7)
    _prefill(ref, [s for s in seqs if s.num_tokens > 1])
    for (k, v), (k0, v0) in zip(tri.kv_caches, ref.kv_caches):
        k.copy_(k0)
        v.copy_(v0)
    for s in seqs:
        s.num_computed_tokens = s.num_tokens - 1
    sched = [(s, 1) for s in seqs]
    want = ref.execute(ref.build_batch(sched, {}))
    tiny_model.language_model.fused_ops = "on"
    try:
        batch = tri.build_static_decode_batch(sched)
        got = tri.execute(batch)
    finally:
        tiny_model.language_model.fused_ops = "auto"
    assert batch.bucket == 8 and batch.num_seqs == 5
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for (k, v), (k0, v0) in zip(tri.kv_caches, ref.kv_caches):
        torch.testing.assert_close(k, k0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v, v0, atol=1e-6, rtol=1e-6)
