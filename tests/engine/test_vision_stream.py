"""Vision side: the SigLIP tower really runs torch SDPA, and the side-stream encode API gives the same tokens as the
synchronous path (on CPU it encodes at submit time)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from xgenmm.checkpoint import load_model
from xgenmm.engine.model_runner import ModelRunner
from xgenmm.engine.vision_stream import PendingImageEmbeds, VisionStream
from xgenmm.multimodal.image_processing import ImageProcessor


def _images(ckpt, n: int):
    processor = ImageProcessor.from_pretrained(ckpt)
    rng = np.random.default_rng(0)
    sizes = [(500, 300), (300, 700), (384, 384)]
    return [processor(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB"))
            for w, h in sizes[:n]]  # fmt: skip


def test_siglip_tower_uses_sdpa(tiny_checkpoint):
    model = load_model(tiny_checkpoint, "cpu", "float32")
    tower = model.vision.vision_encoder
    assert tower.config._attn_implementation == "sdpa"
    images = _images(tiny_checkpoint, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.encode_images(images)
    names = {e.key for e in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in names
    layers = len(tower.encoder.layers)
    calls = {e.key: e.count for e in prof.key_averages()}["aten::scaled_dot_product_attention"]
    assert calls >= layers  # one per SigLIP layer at least (the perceiver adds its own)


def test_encode_images_async_matches_sync_on_cpu(tiny_checkpoint):
    model = load_model(tiny_checkpoint, "cpu", "float32")
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, 16, 8, "torch")
    images = _images(tiny_checkpoint, 3)
    want = runner.encode_images(images)
    pending = runner.encode_images_async(images)
    assert isinstance(pending, PendingImageEmbeds) and pending.ready()
    got = pending.result()
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert pending.result() is got  # idempotent


def test_vision_stream_on_cpu_runs_the_callable_once_at_submit():
    calls = []

    def encode(images):
        calls.append(list(images))
        return [torch.full((2, 3), float(i)) for i in images]

    pending = VisionStream("cpu").submit(encode, [1, 2])
    assert calls == [[1, 2]]
    assert [t[0, 0].item() for t in pending.result()] == [1.0, 2.0]
    assert calls == [[1, 2]]


def test_engine_prefetches_waiting_images_and_tokens_do_not_change(tiny_checkpoint):
    """`prefetch_images=True` (the CUDA default; forced here on CPU, where the side stream encodes at submit time):
    with two running sequences at most, the images of waiting requests are encoded ahead through
    `encode_images_async`, each distinct image exactly once, and greedy tokens equal the engine without prefetch."""
    from xgenmm import LLM, SamplingParams
    from xgenmm.client import open_engine

    rng = np.random.default_rng(1)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
                for w, h in [(500, 300), (300, 700), (384, 384), (640, 480), (200, 200)]]
    prompts = [{"prompt": f"<|user|>\n<image>\nWhat is in picture {i}?<|end|>\n<|assistant|>\n",
                "multi_modal_data": {"image": pictures[i % len(pictures)]}} for i in range(8)]  # 3 repeat an image
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    results = {}
    for prefetch in (False, True):
        handle = open_engine("native", str(tiny_checkpoint), "cpu", "float32", max_num_seqs=2, prefetch_images=prefetch,
                                  enable_prefix_caching=False, enforce_eager=not prefetch, shared=False)
        try:
            engine = handle.core
            assert engine.vision.prefetch_enabled is prefetch
            runner = engine.runner
            # the engine's limits reach the runner (they size the CUDA graph buckets); enforce_eager turns graphs off
            assert runner.max_num_seqs == 2 and runner.max_model_len == engine.max_model_len
            assert runner.cuda_graphs_disabled_reason == ("CUDA graphs disabled" if not prefetch else "not on CUDA")
            encoded_sync, encoded_ahead = [], []
            encode, encode_async = runner.encode_images, runner.encode_images_async

            def counting_encode(images, _encode=encode, _log=encoded_sync):
                _log.extend(img.content_hash for img in images)
                return _encode(images)

            def counting_async(images, _encode_async=encode_async, _log=encoded_ahead):
                _log.extend(img.content_hash for img in images)
                return _encode_async(images)

            runner.encode_images_async = counting_async
            runner.encode_images = counting_encode  # the async path calls this too (after logging ahead)
            outs = LLM.from_handle(handle).generate(prompts, params)
            results[prefetch] = [o.outputs[0].token_ids for o in outs]
            # every distinct picture reached the vision tower exactly once
            assert sorted(set(encoded_sync)) == sorted(encoded_sync) and len(encoded_sync) == len(pictures)
            if prefetch:
                assert len(encoded_ahead) >= 3, "waiting requests' images were not encoded ahead"
                assert not engine.vision._prefetching  # every prefetched encoding was consumed
            else:
                assert encoded_ahead == []
            assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
        finally:
            handle.shutdown()
    assert results[True] == results[False]
