"""Our AVX2 float32 linear on packed weights (`torch.ops.xgenmm_avx2.linear_f32`, csrc/linear_f32_avx2.cpp) and the
layer on it (`PackedF32Linear`), which runs a float32 language model on AVX2 CPUs.

Checked: packing round-trips (widths that are not a multiple of the 64-output panel, depths that are not a multiple
of the 64-input block), results against float64 math within float32 accumulation error, every row bit for bit the
same alone, inside batches of many sizes (every tile shape, the 192-row blocks) and at any offset, typed refusals of
wrong inputs, and the layer's state dict keeping the plain [N, K] weight while it runs packed."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from xgenmm import cpu_kernels
from xgenmm.model.cpu_linear import PackedF32Linear, use_packed_f32_linears

pytestmark = pytest.mark.skipif(not cpu_kernels.int8_available(),
                                reason=f"AVX2 kernels unavailable here: {cpu_kernels.int8_unavailable_reason()}")

ops = torch.ops.xgenmm_avx2 if hasattr(torch.ops, "xgenmm_avx2") else None


def _weights(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randn(n, generator=g), g


@pytest.mark.parametrize("n,k", [(1, 5), (48, 128), (64, 64), (130, 97), (200, 3072), (70, 1153)])
def test_packing_round_trips(n, k):
    w, *_ = _weights(n, k, n + k)
    packed = ops.pack_f32_weight(w)
    assert packed.shape == ((n + 63) // 64, k, 64)
    assert torch.equal(ops.unpack_f32_weight(packed, n), w)


@pytest.mark.parametrize("m,n,k", [(1, 130, 97), (2, 64, 64), (3, 48, 128), (8, 200, 3072), (17, 64, 300),
                                   (200, 80, 1153)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_math(m, n, k, with_bias):
    w, bias, g = _weights(n, k, m * n + k)
    bias = bias if with_bias else None
    x = torch.randn(m, k, generator=g)
    ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    y = ops.linear_f32(x, ops.pack_f32_weight(w), bias, n)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # float32 accumulation over k terms: a few ulps of the largest partial sums
    tol = 1e-6 * k**0.5 * (x.double().abs() @ w.double().abs().t()).max()
    assert float((y.double() - ref).abs().max()) <= float(tol)
    assert ops.linear_f32(x.view(1, m, k), ops.pack_f32_weight(w), bias, n).shape == (1, m, n)


@settings(max_examples=int(os.environ.get("XGENMM_HYPOTHESIS_EXAMPLES", "12")), deadline=None)
@given(rows=st.integers(1, 400), pick=st.data())
def test_a_rows_bits_do_not_depend_on_the_batch(rows, pick):
    """Bit for bit: any row alone, inside the whole batch, inside any slice of it (tiles of 1-6 rows, 192-row
    blocks: every tile shape and block boundary meets the same row)."""
    w, bias, g = _weights(90, 200, rows)
    packed = ops.pack_f32_weight(w)
    x = torch.randn(rows, 200, generator=g)
    full = ops.linear_f32(x, packed, bias, 90)
    i = pick.draw(st.integers(0, rows - 1))
    j = pick.draw(st.integers(i + 1, rows))
    assert torch.equal(ops.linear_f32(x[i:j], packed, bias, 90), full[i:j])
    assert torch.equal(ops.linear_f32(x[i:i + 1], packed, bias, 90), full[i:i + 1])


def test_refuses_what_it_cannot_run():
    w, bias, _ = _weights(64, 32, 0)
    packed = ops.pack_f32_weight(w)
    with pytest.raises(RuntimeError, match="float32 input"):
        ops.linear_f32(torch.randn(2, 32).bfloat16(), packed, bias, 64)
    with pytest.raises(RuntimeError, match="features"):
        ops.linear_f32(torch.randn(2, 33), packed, bias, 64)
    with pytest.raises(RuntimeError, match="panels"):
        ops.linear_f32(torch.randn(2, 32), packed, bias, 200)
    with pytest.raises(RuntimeError, match="bias"):
        ops.linear_f32(torch.randn(2, 32), packed, torch.randn(3), 64)
    with pytest.raises(RuntimeError, match="float32"):
        ops.pack_f32_weight(w.bfloat16())
    assert ops.linear_f32(torch.randn(0, 32), packed, bias, 64).shape == (0, 64)


def test_layer_keeps_the_plain_state_dict_and_matches_nn_linear():
    net = nn.Sequential(nn.Linear(100, 70), nn.ReLU(), nn.Linear(70, 130, bias=False))
    plain = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 100)
    with torch.inference_mode():
        want = net(x)
    assert use_packed_f32_linears(net) == 2 and all(type(net[i]) is PackedF32Linear for i in (0, 2))
    assert use_packed_f32_linears(net) == 0  # idempotent
    state = net.state_dict()
    assert state.keys() == plain.keys() and all(torch.equal(state[k], plain[k]) for k in plain)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
    other = nn.Sequential(nn.Linear(100, 70), nn.ReLU(), nn.Linear(70, 130, bias=False))
    use_packed_f32_linears(other)
    other.load_state_dict(plain)  # packed again from the plain weights
    with torch.inference_mode():
        assert torch.equal(other(x), net(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict({**plain, "0.weight": torch.randn(70, 99)})
    assert use_packed_f32_linears(nn.Sequential(nn.Linear(4, 4).bfloat16())) == 0  # float32 layers only


@pytest.mark.parametrize("n,k", [(64, 64), (128, 97), (192, 1153), (256, 3072)])
def test_packing_in_place_reuses_the_weights_memory(n, k):
    w, *_ = _weights(n, k, n * k)
    owned = w.clone()
    packed = ops.pack_f32_weight_(owned)
    assert packed.data_ptr() == owned.data_ptr() and torch.equal(packed, ops.pack_f32_weight(w))
    assert torch.equal(ops.unpack_f32_weight(packed, n), w)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        ops.pack_f32_weight_(torch.randn(70, k))


def test_a_replaced_layer_gives_its_weight_memory_to_the_packed_one():
    layer = nn.Linear(96, 128)
    want = layer.weight.detach().clone()
    ptr = layer.weight.data_ptr()
    packed = PackedF32Linear(layer)
    assert packed.weight_packed.data_ptr() == ptr and torch.equal(packed.weight, want)
    odd = nn.Linear(96, 70)  # a width the in-place layout cannot hold: packed into new memory
    odd_want = odd.weight.detach().clone()
    assert torch.equal(PackedF32Linear(odd).weight, odd_want) and torch.equal(odd.weight, odd_want)
