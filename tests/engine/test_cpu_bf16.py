"""bfloat16 on CPU: the automatic dtype, and the engine's invariants in bf16 (greedy output identical alone, batched,
preempted by recompute and prefix-cached; images encoded alone or grouped give the same tokens). The fidelity of bf16
against float32 (next to transformers' own bf16 error) is `benchmarks/bf16_fidelity.py` and its test below."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.support import mixed_engine_requests, tokens_and_logprobs
from xgenmm import LLM, SamplingParams, cpu_kernels
from xgenmm.checkpoint import load_model
from xgenmm.cpu_features import cpu_computes_bf16
from xgenmm.placement import resolve_dtype
from xgenmm.model.config import XGenMMConfig
from xgenmm.client import open_engine

native_bf16 = pytest.mark.skipif(not (cpu_computes_bf16() and cpu_kernels.available()),
                                 reason="this CPU has no native bf16 (or the CPU kernels did not build)")


def test_auto_dtype_on_cpu_is_bf16_exactly_where_the_cpu_computes_it(tiny_checkpoint):
    config = XGenMMConfig.from_pretrained(tiny_checkpoint)
    expected = torch.bfloat16 if cpu_computes_bf16() else torch.float32
    assert resolve_dtype(None, config, torch.device("cpu")) == expected
    assert resolve_dtype("auto", config, torch.device("cpu")) == expected
    assert resolve_dtype("float32", config, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, config, torch.device("cuda")) == torch.bfloat16
    assert cpu_computes_bf16() == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@native_bf16
def test_bf16_engine_identical_alone_batched_preempted_and_cached(tiny_checkpoint, fixture_dir):
    """Greedy tokens and their logprobs, bit for bit (with oneDNN's bf16 GEMM for the language model, or the
    gathering reference attention, the logprobs already differ between alone and batched)."""
    images = [Image.open(p) for p in sorted((fixture_dir / "images").glob("*.png"))]
    prompts = mixed_engine_requests(12, images)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    handle = open_engine("native", str(tiny_checkpoint), "cpu", "bfloat16", shared=False)
    try:
        engine = handle.core
        assert engine.dtype == torch.bfloat16 and engine.runner.kv_caches[0][0].dtype == torch.bfloat16
        assert engine.runner.backend.name == "cpu_paged" and engine.model.linear_kernel == "onednn+xgenmm_bf16"
        llm = LLM.from_handle(handle)
        alone = [tokens_and_logprobs(llm.generate(p, params)[0]) for p in prompts[:5]]
        batched = [tokens_and_logprobs(o) for o in llm.generate(prompts, params)]
        assert batched[:5] == alone
        cached = llm.generate(prompts, params)
        assert [tokens_and_logprobs(o) for o in cached] == batched
        assert all(o.num_cached_tokens > 0 for o in cached)
    finally:
        handle.shutdown()
    small = open_engine("native", str(tiny_checkpoint), "cpu", "bfloat16", kv_cache_memory_bytes=70 * 16 * 512,
                               max_num_batched_tokens=256, enable_prefix_caching=False, shared=False)
    try:
        preempted = LLM.from_handle(small).generate(prompts, params)
        assert small.stats().num_preemptions > 0
        assert [tokens_and_logprobs(o) for o in preempted] == batched
    finally:
        small.shutdown()


@native_bf16
def test_bf16_vision_tokens_do_not_depend_on_grouping(tiny_checkpoint, fixture_dir):
    from xgenmm.multimodal.image_processing import ImageProcessor

    model = load_model(tiny_checkpoint, "cpu", "bfloat16")
    processor = ImageProcessor.from_pretrained(tiny_checkpoint)
    images = [processor(Image.open(p)) for p in sorted((fixture_dir / "images").glob("*.png"))[:3]]
    grouped = model.encode_images(images)
    for image, tokens in zip(images, grouped):
        assert tokens.dtype == torch.bfloat16
        assert torch.equal(model.encode_images([image])[0], tokens)


@native_bf16
def test_bf16_fidelity_gate_on_the_upstream_fixtures(fixture_dir):
    """Teacher-forced on upstream's float32 greedy continuations: our bf16 is no further from our float32 than
    transformers' bf16 is from its float32 (the full run, with a small-preset corpus: benchmarks/bf16_fidelity.py)."""
    from xgenmm.testing import fidelity

    samples = fidelity.fixture_samples(fixture_dir)[::2]
    result = fidelity.measure(fixture_dir / "checkpoint", samples)
    ours, theirs = result["ours"], result["transformers"]
    assert ours.positions == theirs.positions == sum(len(s.continuation) for s in samples)
    assert 0 < ours.mean_logit_error and 0 < theirs.mean_logit_error  # bf16 really ran on both sides
    assert fidelity.gate_passes(result), result
