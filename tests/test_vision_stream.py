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
from xgenmm.image_processing import ImageProcessor


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
