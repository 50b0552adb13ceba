"""Our AVX2 int8 weight-only linear (`torch.ops.xgenmm_avx2`, csrc/int8_linear_avx2.cpp) and the int8 layer on it.

Checked: packing round-trips (widths that are not a multiple of the 64-output panel), results against float64 math
(float32 activations to float32 accumulation error, bf16 ones within one output rounding), every row bit for bit the
same alone, inside batches of many sizes (across the 6-row tiles and the 96-row blocks) and at any offset, and the
layer's state dict / quantized-weights cache keeping the plain int8 [N, K] layout while the layer runs packed."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xgenmm import cpu_kernels
from xgenmm.cpu_kernels import build
from xgenmm.model.quant import Int8WeightOnlyLinear
from xgenmm.model.quant.cache import QuantizedWeightsCache

pytestmark = pytest.mark.skipif(not cpu_kernels.int8_available(),
                                reason=f"AVX2 int8 kernel unavailable here: {cpu_kernels.int8_unavailable_reason()}")

ops = torch.ops.xgenmm_avx2 if hasattr(torch.ops, "xgenmm_avx2") else None


def _weights(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return q, torch.rand(n, generator=g) * 0.02 + 1e-3, torch.randn(n, generator=g), g


def _reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = (x.double() @ q.double().t()) * scales.double()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("n,k", [(1, 5), (48, 128), (64, 64), (130, 97), (200, 3072)])
def test_packing_round_trips(n, k):
    q, *_ = _weights(n, k, n + k)
    packed = ops.pack_int8_weight(q)
    assert packed.shape == ((n + 63) // 64, k, 64)
    assert torch.equal(ops.unpack_int8_weight(packed, n), q)


@pytest.mark.parametrize("m,n,k", [(1, 130, 97), (3, 48, 128), (8, 200, 3072), (17, 64, 300), (100, 80, 256)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_math(m, n, k, with_bias):
    q, scales, bias, g = _weights(n, k, m * n + k)
    bias = bias if with_bias else None
    packed = ops.pack_int8_weight(q)
    x = torch.randn(m, k, generator=g)
    ref = _reference(x, q, scales, bias)
    y = ops.int8_linear(x, packed, scales, bias, n)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # float32 accumulation over k terms: a few ulps of the largest partial sums
    tol = 1e-6 * k**0.5 * ((x.double().abs() @ q.double().abs().t()) * scales.double()).max()
    assert float((y.double() - ref).abs().max()) <= float(tol)
    xb = x.bfloat16()
    yb = ops.int8_linear(xb, packed, scales, bias, n)
    ref_b = _reference(xb.float(), q, scales, bias)
    assert yb.dtype == torch.bfloat16
    ulp = 2.0 ** (torch.floor(torch.log2(ref_b.abs().clamp_min(1e-30))) - 7)  # bf16 spacing at each output
    assert bool(((yb.double() - ref_b).abs() <= ulp * 0.5 + float(tol)).all())
    assert ops.int8_linear(xb.view(1, m, k), packed, scales, bias, n).shape == (1, m, n)


@settings(max_examples=int(os.environ.get("XGENMM_HYPOTHESIS_EXAMPLES", "12")), deadline=None)
@given(rows=st.integers(1, 130), dtype=st.sampled_from([torch.float32, torch.bfloat16]), pick=st.data())
def test_a_rows_bits_do_not_depend_on_the_batch(rows, dtype, pick):
    """Bit for bit: any row alone, inside the whole batch, inside any slice of it (tiles of 1-6 rows, 96-row
    blocks: every tile shape and block boundary meets the same row)."""
    q, scales, bias, g = _weights(90, 200, rows)
    packed = ops.pack_int8_weight(q)
    x = torch.randn(rows, 200, generator=g).to(dtype)
    full = ops.int8_linear(x, packed, scales, bias, 90)
    i = pick.draw(st.integers(0, rows - 1))
    j = pick.draw(st.integers(i + 1, rows))
    assert torch.equal(ops.int8_linear(x[i:j], packed, scales, bias, 90), full[i:j])
    assert torch.equal(ops.int8_linear(x[i : i + 1], packed, scales, bias, 90), full[i : i + 1])


def test_every_row_alone_equals_batches_of_several_sizes():
    q, scales, bias, g = _weights(300, 1024, 7)
    packed = ops.pack_int8_weight(q)
    x = torch.randn(200, 1024, generator=g).bfloat16()
    alone = torch.cat([ops.int8_linear(x[i : i + 1], packed, scales, bias, 300) for i in range(200)])
    for size in (2, 3, 4, 5, 6, 7, 8, 12, 16, 97, 200):
        batched = torch.cat([ops.int8_linear(x[s : s + size], packed, scales, bias, 300) for s in range(0, 200, size)])
        assert torch.equal(batched, alone), size


def test_bad_inputs_are_errors_not_crashes():
    q, scales, bias, _ = _weights(70, 64, 1)
    packed = ops.pack_int8_weight(q)
    with pytest.raises(RuntimeError, match="features"):
        ops.int8_linear(torch.randn(2, 63), packed, scales, bias, 70)
    with pytest.raises(RuntimeError, match="panels"):
        ops.int8_linear(torch.randn(2, 64), packed, scales, bias, 200)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        ops.int8_linear(torch.randn(2, 64).half(), packed, scales, bias, 70)
    with pytest.raises(RuntimeError, match="int8"):
        ops.pack_int8_weight(q.float())
    assert ops.int8_linear(torch.empty(0, 64), packed, scales, bias, 70).shape == (0, 70)


def test_layer_runs_packed_and_saves_the_plain_layout(tmp_path):
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(130, 96, generator=g) / 10, torch.randn(130, generator=g)
    layer = Int8WeightOnlyLinear.from_weight(weight, bias)
    assert layer.packed and "weight_int8" not in layer._buffers  # the plain copy is freed
    plain = layer.weight_int8
    assert plain.shape == (130, 96) and plain.dtype == torch.int8
    assert torch.equal(plain, torch.round(weight / layer.scales[:, None]).clamp(-127, 127).to(torch.int8))
    state = layer.state_dict()
    assert set(state) == {"weight_int8", "scales", "bias"} and torch.equal(state["weight_int8"], plain)
    x = torch.randn(5, 96, generator=g)
    expected = layer(x)
    torch.testing.assert_close(expected, x @ layer.dequantize().t() + bias, rtol=1e-5, atol=1e-5)

    other = Int8WeightOnlyLinear.empty(96, 130, torch.float32)
    other.load_state_dict(state)
    other.finish_loading()
    assert other.packed and torch.equal(other(x), expected)
    other.load_state_dict(state)  # loading into a packed layer repacks
    assert other.packed and torch.equal(other(x), expected)

    cache = QuantizedWeightsCache(tmp_path, {"method": "int8", "test": True})
    cache.write({"layer": layer})
    (reread,) = dict(cache.read(torch.device("cpu"))).values()
    assert reread.packed and torch.equal(reread(x), expected)


def test_the_kernel_is_off_under_xgenmm_cpu_kernels_0(monkeypatch):
    monkeypatch.setenv("XGENMM_CPU_KERNELS", "0")
    assert build._why_not(build.AVX2_INT8) == "disabled by XGENMM_CPU_KERNELS=0"
