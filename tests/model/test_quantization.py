"""Weight-only quantization (model/quant/): each quantized layer against its own dequantized weights, rows
independent of the batch bit for bit, the loader quantizing every language-model linear and the decoupled head (its
3 extra rows and bias included), bounded logit error against the unquantized model in float32 and bf16, typed errors
for bad values, and the quantized-weights cache round trip."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from xgenmm.checkpoint import load_model
from xgenmm.errors import ConfigError, QuantizationError, XGenMMError
from xgenmm.model.quant import (
    QUANTIZATION_METHODS,
    QUANTIZED_LINEARS,
    Int4WeightOnlyLinear,
    Int8StoredLinear,
    check_quantization,
    quantize_language_model,
)
from xgenmm.model.quant.cache import INFO_FILE
from xgenmm.model.quant.loading import vision_linears
from xgenmm.special_tokens import IMAGE_TOKEN_ID
from xgenmm.testing.fidelity import Sample, ours_logits

# Relative error of one layer's output against the float32 matmul on its dequantized weight: the activations enter
# the kernels in bf16 (int8, int4) or fp8 (fp8), so that rounding is all that separates them.
ACTIVATION_ROUNDING = {"int8": 2e-2, "int4": 2e-2, "fp8": 0.12}
# Relative error against the original float32 weight: the quantization itself (int4 groups are coarse, fp8 keeps 3
# mantissa bits).
WEIGHT_ROUNDING = {"int8": 2e-2, "int4": 0.15, "fp8": 0.12}


def _linear(n: int, k: int, bias: bool, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=g))
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_its_dequantized_weight_and_the_original(method, dtype, bias):
    layer = _linear(80, 256, bias)  # 80 rows: not a multiple of 16 (int4 / fp8 pad, like the 32015-row head)
    q = QUANTIZED_LINEARS[method].from_weight(layer.weight, layer.bias)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = q(x)
    assert out.shape == (2, 3, 80) and out.dtype == dtype
    dequant = F.linear(x.float(), q.dequantize(), None if layer.bias is None else layer.bias.float())
    assert _rel(out, dequant) < ACTIVATION_ROUNDING[method]
    assert _rel(out, F.linear(x.float(), layer.weight, layer.bias)) < WEIGHT_ROUNDING[method]
    assert _rel(q.dequantize(), layer.weight) < WEIGHT_ROUNDING[method]


def test_int8_scales_are_per_output_channel_and_symmetric():
    layer = _linear(32, 64, False)
    with torch.no_grad():
        layer.weight[5] *= 100.0  # one loud channel must not coarsen the others
    q = QUANTIZED_LINEARS["int8"].from_weight(layer.weight, None)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    torch.testing.assert_close(q.scales, layer.weight.abs().amax(1) / 127)
    others = torch.cat([torch.arange(5), torch.arange(6, 32)])
    assert _rel(q.dequantize()[others], layer.weight[others]) < 1e-2


def test_int4_groups_of_128_where_the_width_allows():
    assert Int4WeightOnlyLinear.from_weight(torch.randn(16, 3072), None).group_size == 128
    assert Int4WeightOnlyLinear.from_weight(torch.randn(16, 64), None).group_size == 64
    with pytest.raises(QuantizationError, match="int8"):
        Int4WeightOnlyLinear.from_weight(torch.randn(16, 40), None)


@settings(max_examples=int(__import__("os").environ.get("XGENMM_HYPOTHESIS_EXAMPLES", "12")), deadline=None)
@given(method=st.sampled_from(("int8", "int4")), rows=st.integers(1, 40), pick=st.data())
def test_a_rows_result_does_not_depend_on_the_batch(method, rows, pick):
    """Bit for bit: a row computed alone, inside any batch, at any offset (int8 / int4; fp8's `_scaled_mm` makes no
    such promise: on CPU, at full widths, it does not keep it: benchmarks/results/quantization_kernels.json)."""
    q = QUANTIZED_LINEARS[method].from_weight(_linear(48, 128, True).weight, torch.randn(48))
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).bfloat16()
    full = q(x)
    i = pick.draw(st.integers(0, rows - 1))
    j = pick.draw(st.integers(i + 1, rows))
    assert torch.equal(q(x[i:j]), full[i:j])
    assert torch.equal(q(x[i : i + 1]), full[i : i + 1])


def test_empty_batch():
    for method in QUANTIZATION_METHODS:
        q = QUANTIZED_LINEARS[method].from_weight(torch.randn(32, 64), None)
        assert q(torch.empty(0, 64)).shape == (0, 32)


@pytest.mark.parametrize("bad", ["int3", "INT8", "gptq", "", 8, True])
def test_bad_quantization_is_a_typed_error_naming_the_allowed_values(bad, tiny_checkpoint):
    with pytest.raises(QuantizationError, match="'int8', 'int4', 'fp8'") as info:
        check_quantization(bad)
    assert isinstance(info.value, (ConfigError, XGenMMError))
    with pytest.raises(QuantizationError):
        load_model(tiny_checkpoint, "cpu", "float32", quantization=bad)


def test_gpu_only_rules_are_checked_before_loading():
    assert check_quantization(None) is None and check_quantization("int8", "cpu") == "int8"
    with pytest.raises(QuantizationError, match="cpu or cuda"):
        check_quantization("int8", "meta")


def _samples(model) -> list[Sample]:
    """A text prompt and an image prompt with a fixed continuation (teacher-forced)."""
    from PIL import Image

    from xgenmm.multimodal.image_processing import ImageProcessor

    processor = ImageProcessor.from_pretrained(model.checkpoint_dir)
    image = processor(Image.new("RGB", (64, 48), (200, 30, 90)))
    g = torch.Generator().manual_seed(3)
    text = torch.randint(0, 32000, (12,), generator=g).tolist()
    return [Sample(text, [], torch.randint(0, 32000, (6,), generator=g).tolist()),
            Sample([IMAGE_TOKEN_ID] + text[:5], [image], torch.randint(0, 32000, (6,), generator=g).tolist())]


# Bound on the relative logit error of the whole tiny model (2 layers + the head) against the unquantized one.
MODEL_LOGIT_ERROR = {"int8": 0.03, "int4": 0.35, "fp8": 0.15}  # int4: groups of 64 on random weights


@pytest.fixture(scope="module")
def unquantized(tiny_checkpoint):
    """dtype -> (samples, the unquantized model's logits for them)."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        base = load_model(tiny_checkpoint, "cpu", dtype)
        samples = _samples(base)
        out[dtype] = samples, [ours_logits(base, s) for s in samples]
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_quantized_model_logits_stay_close_to_the_unquantized_model(tiny_checkpoint, unquantized, method, dtype):
    quant = load_model(tiny_checkpoint, "cpu", dtype, quantization=method)
    lm_linears = [m for m in quant.language_model.modules() if isinstance(m, nn.Linear)]
    assert lm_linears == []  # every language-model linear is quantized...
    assert quant.lm_head_weight is None and quant.lm_head_quantized.out_features == quant.vocab_size
    vision_linears = [m for m in quant.vision.modules() if isinstance(m, nn.Linear | Int8StoredLinear)]
    if method in ("int8", "int4"):  # ...the vision tower and perceiver keep int8 weights at rest, computed in dtype
        assert vision_linears and all(isinstance(m, Int8StoredLinear) for m in vision_linears)
    else:  # fp8 (the GPU's) leaves them in the model dtype
        assert vision_linears and all(m.weight.dtype == getattr(torch, dtype) for m in vision_linears)
    samples, wanted = unquantized[dtype]
    for sample, want in zip(samples, wanted):
        got = ours_logits(quant, sample)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert _rel(got, want) < MODEL_LOGIT_ERROR[method], (method, dtype)


@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_decoupled_head_keeps_its_extra_rows_and_bias(tiny_checkpoint, method):
    """Ids 32012..32014 come from `lm_head.additional_fc`: their logits (weight rows and bias) survive quantization."""
    base = load_model(tiny_checkpoint, "cpu", "float32")
    quant = load_model(tiny_checkpoint, "cpu", "float32", quantization=method)
    hidden = torch.randn(4, base.config.text.hidden_size, generator=torch.Generator().manual_seed(0))
    want, got = base.compute_logits(hidden), quant.compute_logits(hidden)
    extra = slice(base.config.text.initial_tokenizer_len, None)
    assert got[:, extra].shape == (4, 3)
    assert _rel(got[:, extra], want[:, extra]) < WEIGHT_ROUNDING[method]
    # the bias is exact: zero hidden states give exactly the bias
    zero = quant.compute_logits(torch.zeros(1, base.config.text.hidden_size))[0]
    torch.testing.assert_close(zero, base.lm_head_bias.float(), rtol=0, atol=0)


def test_quantizing_a_loaded_model_equals_quantizing_while_loading(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint, "cpu", "float32")
    vision = vision_linears(loaded)
    assert vision  # the tiny vision tower and perceiver have linears, kept int8 at rest too
    assert quantize_language_model(loaded, "int8") == 2 * 4 + 1 + len(vision)  # 4 per layer, 2 layers, the head
    streamed = load_model(tiny_checkpoint, "cpu", "float32", quantization="int8")
    for (name, a), (_, b) in zip(loaded.state_dict().items(), streamed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_quantized_weights_cache_round_trip(tiny_checkpoint, tmp_path, method, caplog):
    first = load_model(tiny_checkpoint, "cpu", "float32", quantization=method, quantized_cache_dir=tmp_path)
    (folder,) = [p for p in tmp_path.iterdir()]
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["origin"]["method"] == method and info["origin"]["format_version"] == 2
    assert info["layers"]["lm_head_quantized"]["method"] == method
    stored = {name for name, spec in info["layers"].items() if spec["method"] == "int8-stored"}
    assert stored == (set(vision_linears(first)) if method in ("int8", "int4") else set())
    with caplog.at_level("INFO", logger="xgenmm.quant"):
        second = load_model(tiny_checkpoint, "cpu", "float32", quantization=method, quantized_cache_dir=tmp_path)
    assert any("read from" in r.getMessage() for r in caplog.records)  # the second start skipped quantizing
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hidden = torch.randn(3, first.config.text.hidden_size)
    assert torch.equal(first.compute_logits(hidden), second.compute_logits(hidden))


def test_cache_misses_when_the_checkpoint_or_method_changes(tiny_checkpoint, tmp_path):
    load_model(tiny_checkpoint, "cpu", "float32", quantization="int8", quantized_cache_dir=tmp_path)
    load_model(tiny_checkpoint, "cpu", "float32", quantization="int4", quantized_cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    shard = sorted(tiny_checkpoint.glob("*.safetensors"))[0]
    stat = shard.stat()
    import os

    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the checkpoint "changed"
    try:
        load_model(tiny_checkpoint, "cpu", "float32", quantization="int8", quantized_cache_dir=tmp_path)
        assert len(list(tmp_path.iterdir())) == 3
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
