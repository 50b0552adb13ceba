"""Our C++ fused small ops for bf16 on CPU (`model/cpu_fused_ops.py`) against the torch ops they replace (the same
checks as the Triton kernels' tests/model/test_fused_ops.py), row by row independence of the batch, and the bf16
decoder on them against the plain torch path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.support import decoder_runs
from xgenmm import cpu_kernels
from xgenmm.model import cpu_fused_ops
from xgenmm.model.phi3 import RMSNorm, RotaryEmbedding

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"CPU kernels unavailable here: {cpu_kernels.unavailable_reason()}")


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())


def _norm(dim: int, seed: int) -> RMSNorm:
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=gen))
    return norm.to(torch.bfloat16)


@pytest.mark.parametrize("dim", [64, 96, 100, 3072])  # 100: a ragged tail
def test_rms_norm_matches_phi3_rmsnorm(dim):
    gen = torch.Generator().manual_seed(dim)
    x = (3 * torch.randn(7, dim, generator=gen)).bfloat16()
    norm = _norm(dim, dim)
    want = norm(x)
    got = cpu_fused_ops.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert _bf16_ulps(got, want) <= 1
    assert (got != want).float().mean() < 0.01  # only where the reduction order tips a rounding
    assert cpu_fused_ops.rms_norm(x.view(7, 1, dim), norm.weight, norm.eps).shape == (7, 1, dim)


def test_add_rms_norm_rounds_the_sum_like_torch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3072, generator=gen).bfloat16()
    residual = (10 * torch.randn(5, 3072, generator=gen)).bfloat16()
    x_before, residual_before = x.clone(), residual.clone()
    norm = _norm(3072, 2)
    out, new_residual = cpu_fused_ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(new_residual, residual + x)  # exactly torch's rounded sum
    assert _bf16_ulps(out, norm(residual + x)) <= 1
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs untouched


def test_add_rms_norm_rejects_mismatched_inputs():
    x = torch.randn(3, 16).bfloat16()
    with pytest.raises(ValueError, match="add_rms_norm"):
        cpu_fused_ops.add_rms_norm(x, torch.randn(3, 16), torch.ones(16).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="weight must be a contiguous bf16"):
        cpu_fused_ops.add_rms_norm(x, x, torch.ones(8).bfloat16(), 1e-5)
    with pytest.raises(RuntimeError, match="needs a bf16 CPU tensor"):
        cpu_fused_ops.rms_norm(torch.randn(3, 16), torch.ones(16), 1e-5)


@pytest.mark.parametrize("inter", [128, 1500, 8192])
def test_silu_and_mul_matches_torch(inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = (4 * torch.randn(6, 2 * inter, generator=gen)).bfloat16()
    gate_up[0, :6] = torch.tensor([-200.0, -90.0, -0.0, 0.0, 90.0, 200.0])  # exp's range ends
    gate, up = gate_up.chunk(2, dim=-1)
    want = up * F.silu(gate)
    got = cpu_fused_ops.silu_and_mul(gate_up)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert torch.isfinite(got.float()).all()
    assert _bf16_ulps(got.abs(), want.abs()) <= 1 and bool(((got.float() * want.float()) >= 0).all())


@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(32, 32, 96, 96), (8, 2, 64, 32)])
def test_rotary_in_place_on_qkv_views_is_bit_identical_to_rotate_half(heads, kv_heads, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    t = 9
    rotary = RotaryEmbedding(head_dim, rotary_dim, 4096, 10000.0)
    positions = torch.tensor([0, 1, 2, 17, 300, 301, 2047, 4000, 4095])
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(t, q_size + 2 * kv_size, generator=gen).bfloat16()
    q, k, _ = qkv.split((q_size, kv_size, kv_size), dim=-1)
    q, k = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim)  # strided views, as in the decoder
    want_q, want_k = rotary(positions, q.clone(), k.clone())
    v_before = qkv[:, q_size + kv_size:].clone()
    got_q, got_k = cpu_fused_ops.rotary_embedding_(positions, q, k, rotary.cos_sin, rotary_dim)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    assert torch.equal(qkv[:, q_size + kv_size:], v_before)  # v untouched
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)  # products and sums only: bit-identical


def test_rotary_rejects_a_position_outside_the_table():
    rotary = RotaryEmbedding(64, 64, 128, 10000.0)
    q, k = torch.zeros(1, 2, 64).bfloat16(), torch.zeros(1, 2, 64).bfloat16()
    with pytest.raises(RuntimeError, match="outside the table"):
        cpu_fused_ops.rotary_embedding_(torch.tensor([128]), q, k, rotary.cos_sin, 64)


def test_rows_do_not_depend_on_the_batch():
    """Each row alone gives the bits it gives inside a batch of 300 (split across threads)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 3072, generator=gen).bfloat16()
    residual = torch.randn(300, 3072, generator=gen).bfloat16()
    gate_up = torch.randn(300, 2 * 1000, generator=gen).bfloat16()
    norm = _norm(3072, 4)
    batch_norm, batch_sum = cpu_fused_ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    batch_act = cpu_fused_ops.silu_and_mul(gate_up)
    for i in (0, 1, 150, 299):
        alone_norm, alone_sum = cpu_fused_ops.add_rms_norm(x[i:i + 1], residual[i:i + 1], norm.weight, norm.eps)
        assert torch.equal(alone_norm[0], batch_norm[i]) and torch.equal(alone_sum[0], batch_sum[i])
        assert torch.equal(cpu_fused_ops.rms_norm(x[i:i + 1], norm.weight, norm.eps)[0],
                           cpu_fused_ops.rms_norm(x, norm.weight, norm.eps)[i])
        assert torch.equal(cpu_fused_ops.silu_and_mul(gate_up[i:i + 1])[0], batch_act[i])


def test_bf16_decoder_uses_them_and_matches_the_plain_path(tiny_checkpoint):
    """auto picks the C++ ops for bf16 CPU tensors; hidden states and the KV cache stay within the plain torch
    path's roundings (only the norms' reduction order differs)."""
    from xgenmm.checkpoint import load_model

    model = load_model(tiny_checkpoint, "cpu", "bfloat16")
    decoder = model.language_model
    assert decoder.fused_ops_for(torch.zeros(1, dtype=torch.bfloat16)) is cpu_fused_ops
    assert decoder.fused_ops_for(torch.zeros(1)) is None  # float32 keeps the plain ops
    results = decoder_runs(model, ("off", "auto"), torch.bfloat16)
    (h_on, c_on), (h_off, c_off) = results["auto"], results["off"]
    assert _bf16_ulps(h_on, h_off) <= 2
    for (k_on, v_on), (k_off, v_off) in zip(c_on, c_off):
        assert _bf16_ulps(k_on, k_off) <= 2 and _bf16_ulps(v_on, v_off) <= 2
