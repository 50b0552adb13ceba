"""Fused Triton small ops (RMSNorm, add+RMSNorm, SiLU*mul, in-place RoPE) against the torch ops they replace,
under TRITON_INTERPRET=1 on CPU, in float32 and bfloat16, plus the fused decoder path against the plain one."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels

import pytest
import torch
import torch.nn.functional as F

if "xgenmm.model.fused_ops" in sys.modules:  # imported earlier without the interpreter: re-decorate
    importlib.reload(sys.modules["xgenmm.model.fused_ops"])
from xgenmm.model import fused_ops  # noqa: E402
from xgenmm.model.phi3 import RMSNorm, RotaryEmbedding  # noqa: E402


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 representable steps between two bf16 tensors of the same sign pattern."""
    ia = a.view(torch.int16).int()
    ib = b.view(torch.int16).int()
    return int((ia - ib).abs().max())


def _norm(dim: int, dtype, seed: int) -> RMSNorm:
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=gen))
    return norm.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 96, 384])
def test_rms_norm_matches_phi3_rmsnorm(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    x = (3 * torch.randn(7, dim, generator=gen)).to(dtype)
    norm = _norm(dim, dtype, dim)
    want = norm(x)
    got = fused_ops.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:
        assert _bf16_ulps(got, want) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_rounds_the_sum_like_torch(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=gen).to(dtype)
    residual = (10 * torch.randn(5, 96, generator=gen)).to(dtype)
    norm = _norm(96, dtype, 2)
    out, new_residual = fused_ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(new_residual, residual + x)  # exactly torch's rounded sum
    want = norm(residual + x)
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    else:
        assert _bf16_ulps(out, want) <= 1
    # inputs untouched
    assert not torch.equal(new_residual, residual)


def test_add_rms_norm_rejects_mismatched_residual():
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="add_rms_norm"):
        fused_ops.add_rms_norm(x, torch.randn(3, 16, dtype=torch.float64), torch.ones(16), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [128, 1500])  # 1500: more than one column block, ragged tail
def test_silu_and_mul_matches_torch(dtype, inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = (4 * torch.randn(6, 2 * inter, generator=gen)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want = up * F.silu(gate)
    got = fused_ops.silu_and_mul(gate_up)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:
        assert _bf16_ulps(got, want) <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(4, 4, 96, 96), (8, 2, 64, 32)])
def test_rotary_in_place_on_qkv_views_matches_rotate_half(dtype, heads, kv_heads, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    t = 9
    rotary = RotaryEmbedding(head_dim, rotary_dim, 4096, 10000.0)
    positions = torch.tensor([0, 1, 2, 17, 300, 301, 2047, 4000, 4095])
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(t, q_size + 2 * kv_size, generator=gen).to(dtype)
    q, k, _ = qkv.split((q_size, kv_size, kv_size), dim=-1)
    q, k = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim)  # strided views, as in the decoder
    want_q, want_k = rotary(positions, q.clone(), k.clone())
    v_before = qkv[:, q_size + kv_size :].clone()
    got_q, got_k = fused_ops.rotary_embedding_(positions, q, k, rotary.cos_sin, rotary_dim)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    assert torch.equal(qkv[:, q_size + kv_size :], v_before)  # v untouched
    # products and sums only, rounded at the same points: bit-identical in both dtypes
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    if rotary_dim < head_dim:  # the pass-through dims are left as they were
        assert torch.equal(got_q[..., rotary_dim:], want_q[..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decoder_path_matches_plain_path(tiny_checkpoint, dtype):
    """The decoder with fused kernels forced on (interpreted) gives the plain path's hidden states and KV cache."""
    from tests.support import decoder_runs
    from xgenmm.checkpoint import load_model

    model = load_model(tiny_checkpoint, "cpu", dtype)
    decoder = model.language_model
    results = decoder_runs(model, ("off", "on"), dtype)
    on, off = results["on"], results["off"]
    if dtype == torch.float32:
        torch.testing.assert_close(on[0], off[0], atol=2e-5, rtol=1e-5)
        for (k_on, v_on), (k_off, v_off) in zip(on[1], off[1]):
            torch.testing.assert_close(k_on, k_off, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(v_on, v_off, atol=2e-5, rtol=1e-5)
    else:  # same roundings; only the norms' reduction order differs
        assert _bf16_ulps(on[0], off[0]) <= 2
        for (k_on, v_on), (k_off, v_off) in zip(on[1], off[1]):
            assert _bf16_ulps(k_on, k_off) <= 2 and _bf16_ulps(v_on, v_off) <= 2
    from xgenmm.model import cpu_fused_ops

    # auto on CPU: never the Triton kernels; our C++ ops where a library runs the dtype (float32: AVX2 CPUs only)
    assert decoder.fused_ops_for(torch.zeros(1)) is (cpu_fused_ops if cpu_fused_ops.supported(torch.zeros(1)) else None)
