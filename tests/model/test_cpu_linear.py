"""CPU linear layers (float32): the loader switches every linear layer and the LM head to oneDNN, except the vision
tower on AVX2 CPUs (ATen's sgemm) and the language model on AVX2 CPUs (our packed kernel where it is built); the
switch keeps parameters and state dict, and the numbers stay at float32 rounding distance from ATen's `F.linear`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xgenmm.checkpoint import load_model
from xgenmm.errors import ConfigError
from xgenmm import cpu_kernels
from xgenmm.model.cpu_linear import (OneDNNLinear, PackedF32Linear, onednn_linear, onednn_linear_available,
                                     use_onednn_linears)

pytestmark = pytest.mark.skipif(not onednn_linear_available("cpu", torch.float32),
                                reason="this torch build has no oneDNN CPU linear")


@pytest.mark.parametrize("shape", [(16, 384, 1000), (1, 96, 64), (2, 5, 32, 48), (0, 32, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_aten(shape, bias):
    *lead, k, n = shape
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*lead, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    out = onednn_linear(x, w, b)
    assert out.shape == (*lead, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5 * k ** 0.5)
    xt = torch.randn(k, 7, generator=g).t()  # non-contiguous input
    torch.testing.assert_close(onednn_linear(xt, w, b), F.linear(xt, w, b), rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_switch_keeps_parameters_and_gradients_still_work():
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4, bias=False))
    keys = {k: v.data_ptr() for k, v in net.state_dict().items()}
    x = torch.randn(3, 8, requires_grad=True)
    want = net(x)
    assert use_onednn_linears(net) == 2
    assert all(type(m) is OneDNNLinear for m in (net[0], net[2]))
    assert {k: v.data_ptr() for k, v in net.state_dict().items()} == keys
    got = net(x)  # grad mode with trainable weights: falls back to ATen (the oneDNN op has no autograd formula)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert x.grad is not None and net[0].weight.grad is not None
    assert use_onednn_linears(net) == 0  # idempotent


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_loader_runs_the_model_on_onednn_on_cpu_and_the_float32_vision_on_aten_where_avx2(tiny_checkpoint,
                                                                                          monkeypatch, capability):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    fast = load_model(tiny_checkpoint, "cpu", "float32")
    plain = load_model(tiny_checkpoint, "cpu", "float32", linear_kernel="torch")
    avx2 = capability == "AVX2"  # ATen's sgemm is faster at the vision tower's row counts there
    lm_packed = avx2 and cpu_kernels.int8_available()  # and our packed kernel runs the language model
    assert fast.linear_kernel == ("onednn+xgenmm_f32" if lm_packed else "onednn") and plain.linear_kernel == "torch"
    for name, m in fast.named_modules():
        if type(m) in (nn.Linear, OneDNNLinear, PackedF32Linear):
            if name.startswith("vision."):
                want = nn.Linear if avx2 else OneDNNLinear
            else:
                want = PackedF32Linear if lm_packed else OneDNNLinear
            assert type(m) is want, name
    assert sum(type(m) in (nn.Linear, OneDNNLinear, PackedF32Linear) for m in fast.modules()) == sum(
        type(m) is nn.Linear for m in plain.modules())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in fast.state_dict().items())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, fast.config.text.hidden_size, generator=g)
    with torch.inference_mode():  # a decoder layer's linears: packed (or oneDNN) vs ATen
        a_mlp, b_mlp = fast.language_model.layers[0].mlp(x), plain.language_model.layers[0].mlp(x)
        a_qkv = fast.language_model.layers[0].self_attn.qkv_proj(x)
        b_qkv = plain.language_model.layers[0].self_attn.qkv_proj(x)
    torch.testing.assert_close(a_mlp, b_mlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a_qkv, b_qkv, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, fast.config.text.hidden_size, generator=g)
    with torch.inference_mode():
        a, b = fast.compute_logits(hidden), plain.compute_logits(hidden)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    with pytest.raises(ConfigError, match="linear_kernel"):
        load_model(tiny_checkpoint, "cpu", "float32", linear_kernel="mkl")


def test_bfloat16_on_cpu_follows_native_bf16_support(tiny_checkpoint):
    from xgenmm.cpu_features import cpu_computes_bf16

    native = cpu_computes_bf16()
    assert onednn_linear_available("cpu", torch.bfloat16) == native
    assert not onednn_linear_available("cuda", torch.float32)
    model = load_model(tiny_checkpoint, "cpu", "bfloat16")
    assert model.linear_kernel.startswith("onednn") if native else model.linear_kernel == "torch"
