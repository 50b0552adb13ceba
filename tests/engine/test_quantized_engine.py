"""The engine's invariants with a quantized language model (`quantization=`): greedy tokens and their logprobs
identical alone, batched, prefix-cached and preempted by recompute; the option reaching LLM, both adapters and the
CLI; a bad value a typed error before anything loads; the default unchanged."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.support import mixed_engine_requests, tokens_and_logprobs
from xgenmm import LLM, SamplingParams
from xgenmm.client import open_engine
from xgenmm.errors import QuantizationError
from xgenmm.model.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear


@pytest.mark.parametrize("method,dtype", [("int8", "float32"), ("int8", "bfloat16"), ("int4", "float32")])
def test_quantized_engine_identical_alone_batched_cached_and_preempted(tiny_checkpoint, fixture_dir, method, dtype):
    images = [Image.open(p) for p in sorted((fixture_dir / "images").glob("*.png"))]
    prompts = mixed_engine_requests(8, images)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    loop = open_engine("native", str(tiny_checkpoint), "cpu", dtype, shared=False, quantization=method)
    try:
        model = loop.core.model
        layer = {"int8": Int8WeightOnlyLinear, "int4": Int4WeightOnlyLinear}[method]
        assert isinstance(model.language_model.layers[0].mlp.gate_up_proj, layer)
        assert isinstance(model.lm_head_quantized, layer) and loop.core.dtype == getattr(torch, dtype)
        exact = loop.core.runner.backend.name == "cpu_paged"  # our in-place attention kernel: row-exact too
        llm = LLM.from_handle(loop)
        alone = [llm.generate(p, params)[0] for p in prompts[:4]]
        batched = llm.generate(prompts, params)
        _same(batched[:4], alone, exact, dtype)
        cached = llm.generate(prompts, params)  # the same prompts again: prefix-cache hits
        assert all(o.num_cached_tokens > 0 for o in cached)
        _same(cached, batched, exact, dtype)
    finally:
        loop.shutdown()
    # A KV pool far smaller than 8 x ~500 tokens forces preemption by recompute; a small token budget forces chunked
    # prefill mixed with decodes.
    per_token = 2 * 2 * 64 * (4 if dtype == "float32" else 2)  # layers x (K, V) x hidden x bytes
    small = open_engine("native", str(tiny_checkpoint), "cpu", dtype, shared=False, quantization=method,
                        kv_cache_memory_bytes=70 * 16 * per_token, max_num_batched_tokens=256,
                        enable_prefix_caching=False)
    try:
        preempted = LLM.from_handle(small).generate(prompts, params)
        assert small.stats().num_preemptions > 0
        _same(preempted, batched, False, dtype)
    finally:
        small.shutdown()


# How far apart the two best tokens of a step may be and still swap when the attention sums run in another order
# (reference backend, after a preemption or a prefix-cache hit): that order moves a bf16 hidden state by a rounding
# step, which moved logprobs by up to 0.007 on the tiny random checkpoint (its logits are nearly flat: top-2 gaps of
# 0.004 occur); in float32 it is far smaller.
NEAR_TIE = {"float32": 1e-4, "bfloat16": 0.02}


def _top2_gap(out, step: int) -> float:
    best = sorted((lp.logprob for lp in out.outputs[0].logprobs[step].values()), reverse=True)
    return best[0] - best[1]


def _same(got_outs: list, want_outs: list, exact: bool, dtype: str) -> None:
    """Where every layer is row-exact (the quantized linears are, tests/model/test_quantization.py; so is our
    in-place attention kernel): greedy tokens and their logprobs bit for bit. Otherwise (the reference attention,
    used on CPUs without our AVX-512 kernels, sums in another order alone / batched / recomputed in chunks after a
    preemption): the same greedy tokens up to a step whose two best tokens were within that summation's rounding
    of each other (`NEAR_TIE`; from there on the continuations legitimately differ), with logprobs equal to that
    rounding (bf16 scale in a bf16 model)."""
    got, want = [tokens_and_logprobs(o) for o in got_outs], [tokens_and_logprobs(o) for o in want_outs]
    if exact:
        assert got == want
        return
    for (tokens, logprobs), (want_tokens, want_logprobs), want_out in zip(got, want, want_outs):
        step = next((i for i, (a, b) in enumerate(zip(tokens, want_tokens)) if a != b), len(want_tokens))
        if step < len(want_tokens):
            gap = _top2_gap(want_out, step)
            assert gap < NEAR_TIE[dtype], (f"greedy tokens differ at step {step} where the two best were {gap:.4f} "
                                           f"apart: {tokens} vs {want_tokens}")
        assert logprobs[:step] == pytest.approx(want_logprobs[:step], abs=0.1)


def test_bad_quantization_fails_before_loading_with_a_typed_error(tiny_checkpoint):
    with pytest.raises(QuantizationError, match="'int8', 'int4', 'fp8'"):
        LLM(str(tiny_checkpoint), device="cpu", dtype="float32", quantization="int2")


def test_default_is_unquantized_and_a_quantized_engine_is_never_shared_with_it(tiny_checkpoint):
    plain = open_engine("native", str(tiny_checkpoint), "cpu", "float32")
    quant = open_engine("native", str(tiny_checkpoint), "cpu", "float32", quantization="int8")
    assert plain is not quant
    assert plain.core.model.lm_head_quantized is None and plain.core.model.lm_head_weight is not None
    assert isinstance(quant.core.model.lm_head_quantized, Int8WeightOnlyLinear)
    assert open_engine("native", str(tiny_checkpoint), "cpu", "float32", quantization="int8") is quant


def test_adapters_and_cli_forward_quantization(tiny_checkpoint):
    from langchain_xgenmm import ChatXGenMM
    from llamaindex_xgenmm import XGenMM
    from xgenmm.cli.main import build_parser
    from xgenmm.cli.common import engine_options

    chat = ChatXGenMM(model=str(tiny_checkpoint), device="cpu", dtype="float32",
                      engine_options={"quantization": "int8"})
    assert isinstance(chat._engine_clients().handle.core.model.lm_head_quantized, Int8WeightOnlyLinear)
    llm = XGenMM(model=str(tiny_checkpoint), device="cpu", dtype="float32", engine_options={"quantization": "int8"})
    assert isinstance(llm.engine_clients.handle.core.model.lm_head_quantized, Int8WeightOnlyLinear)
    parser = build_parser()
    for command in ("chat", "caption", "serve"):
        argv = [command, "--model", str(tiny_checkpoint), "--quantization", "int4", "--quantized-cache-dir", "/q"]
        if command == "caption":
            argv += ["images/", "--out", "captions.jsonl"]
        args = parser.parse_args(argv)
        assert engine_options(args)["quantization"] == "int4", command
        assert engine_options(args)["quantized_cache_dir"] == "/q", command
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--quantization", "int3"])
