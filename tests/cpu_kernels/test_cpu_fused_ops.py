"""Our C++ fused small ops on CPU (`model/cpu_fused_ops.py`), in each library built here: the AVX-512 BF16 one
(`xgenmm_cpu`, bf16) and the AVX2 one (`xgenmm_avx2`, float32 and bf16), against the torch ops they replace (the
same checks as the Triton kernels' tests/model/test_fused_ops.py), row by row independence of the batch, the
dispatch per dtype, and the decoder on them against the plain torch path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.support import decoder_runs
from xgenmm.cpu_kernels.build import AVX2_INT8, AVX512_BF16, load
from xgenmm.model import cpu_fused_ops
from xgenmm.model.phi3 import RMSNorm, RotaryEmbedding


def _variant(ns, lib, dtype):
    return pytest.param(ns, dtype, marks=pytest.mark.skipif(not load(lib), reason=f"{lib.title} not built here"),
                        id=f"{ns}-{str(dtype).removeprefix('torch.')}")


VARIANTS = [_variant("xgenmm_cpu", AVX512_BF16, torch.bfloat16), _variant("xgenmm_avx2", AVX2_INT8, torch.bfloat16),
            _variant("xgenmm_avx2", AVX2_INT8, torch.float32)]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place (same-sign values)."""
    bits = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return int((a.view(bits).long() - b.view(bits).long()).abs().max())


def _norm(dim: int, seed: int, dtype) -> RMSNorm:
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=gen))
    return norm.to(dtype)


@pytest.mark.parametrize("ns,dtype", VARIANTS)
@pytest.mark.parametrize("dim", [64, 96, 100, 3072])  # 100: a ragged tail
def test_rms_norm_matches_phi3_rmsnorm(ns, dtype, dim):
    ops = getattr(torch.ops, ns)
    gen = torch.Generator().manual_seed(dim)
    x = (3 * torch.randn(7, dim, generator=gen)).to(dtype)
    norm = _norm(dim, dim, dtype)
    want = norm(x)
    got = ops.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert _ulps(got, want) <= (1 if dtype == torch.bfloat16 else 4)  # the reduction order only
    if dtype == torch.bfloat16:
        assert (got != want).float().mean() < 0.01  # only where the reduction order tips a rounding
    assert ops.rms_norm(x.view(7, 1, dim), norm.weight, norm.eps).shape == (7, 1, dim)


@pytest.mark.parametrize("ns,dtype", VARIANTS)
def test_add_rms_norm_rounds_the_sum_like_torch(ns, dtype):
    ops = getattr(torch.ops, ns)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3072, generator=gen).to(dtype)
    residual = (10 * torch.randn(5, 3072, generator=gen)).to(dtype)
    x_before, residual_before = x.clone(), residual.clone()
    norm = _norm(3072, 2, dtype)
    out, new_residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(new_residual, residual + x)  # exactly torch's rounded sum
    assert _ulps(out, norm(residual + x)) <= (1 if dtype == torch.bfloat16 else 4)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs untouched


@pytest.mark.parametrize("ns,dtype", VARIANTS)
def test_bad_inputs_are_refused_with_the_op_and_the_field(ns, dtype):
    ops = getattr(torch.ops, ns)
    x = torch.randn(3, 16).to(dtype)
    with pytest.raises(RuntimeError, match="add_rms_norm: weight must be a contiguous"):
        ops.add_rms_norm(x, x, torch.ones(8).to(dtype), 1e-5)
    with pytest.raises(RuntimeError, match="add_rms_norm: x and residual"):
        ops.add_rms_norm(x, torch.randn(3, 8).to(dtype), torch.ones(16).to(dtype), 1e-5)
    with pytest.raises(RuntimeError, match="rms_norm: needs a"):
        ops.rms_norm(torch.randn(3, 16).double(), torch.ones(16).double(), 1e-5)
    with pytest.raises(RuntimeError, match="silu_and_mul: the last dimension must be even"):
        ops.silu_and_mul(torch.randn(3, 5).to(dtype))


def test_add_rms_norm_rejects_mismatched_inputs_in_python():
    x = torch.randn(3, 16).bfloat16()
    with pytest.raises(ValueError, match="add_rms_norm"):
        cpu_fused_ops.add_rms_norm(x, torch.randn(3, 16), torch.ones(16).bfloat16(), 1e-5)


@pytest.mark.parametrize("ns,dtype", VARIANTS)
@pytest.mark.parametrize("inter", [128, 1500, 8192, 13])
def test_silu_and_mul_matches_torch(ns, dtype, inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = (4 * torch.randn(6, 2 * inter, generator=gen)).to(dtype)
    gate_up[0, :6] = torch.tensor([-200.0, -90.0, -0.0, 0.0, 90.0, 200.0])  # exp's range ends
    gate, up = gate_up.chunk(2, dim=-1)
    want = up * F.silu(gate)
    got = getattr(torch.ops, ns).silu_and_mul(gate_up)
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.isfinite(got.float()).all()
    assert bool(((got.float() * want.float()) >= 0).all())
    if dtype == torch.bfloat16:
        assert _ulps(got.abs(), want.abs()) <= 1
    else:  # exp to ~1 ulp, then a divide and a multiply; silu(-200) is ~1e-85: 0 in both
        torch.testing.assert_close(got, want, rtol=4e-7, atol=1e-30)


@pytest.mark.parametrize("ns,dtype", VARIANTS)
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(32, 32, 96, 96), (8, 2, 64, 32), (2, 1, 20, 20)])
def test_rotary_in_place_on_qkv_views_is_bit_identical_to_rotate_half(ns, dtype, heads, kv_heads, head_dim,
                                                                      rotary_dim):
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    t = 9
    rotary = RotaryEmbedding(head_dim, rotary_dim, 4096, 10000.0)
    positions = torch.tensor([0, 1, 2, 17, 300, 301, 2047, 4000, 4095])
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(t, q_size + 2 * kv_size, generator=gen).to(dtype)
    q, k, _ = qkv.split((q_size, kv_size, kv_size), dim=-1)
    q, k = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim)  # strided views, as in the decoder
    want_q, want_k = rotary(positions, q.clone(), k.clone())
    v_before = qkv[:, q_size + kv_size:].clone()
    getattr(torch.ops, ns).rotary_embedding_(positions, q, k, rotary.cos_sin, rotary_dim)
    assert torch.equal(qkv[:, q_size + kv_size:], v_before)  # v untouched
    assert torch.equal(q, want_q) and torch.equal(k, want_k)  # products and sums only: bit-identical


@pytest.mark.parametrize("ns,dtype", VARIANTS)
def test_rotary_rejects_a_position_outside_the_table(ns, dtype):
    rotary = RotaryEmbedding(64, 64, 128, 10000.0)
    q, k = torch.zeros(1, 2, 64).to(dtype), torch.zeros(1, 2, 64).to(dtype)
    with pytest.raises(RuntimeError, match="outside the table"):
        getattr(torch.ops, ns).rotary_embedding_(torch.tensor([128]), q, k, rotary.cos_sin, 64)


@pytest.mark.parametrize("ns,dtype", VARIANTS)
def test_rows_do_not_depend_on_the_batch(ns, dtype):
    """Each row alone gives the bits it gives inside a batch of 300 (split across threads)."""
    ops = getattr(torch.ops, ns)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 3072, generator=gen).to(dtype)
    residual = torch.randn(300, 3072, generator=gen).to(dtype)
    gate_up = torch.randn(300, 2 * 1000, generator=gen).to(dtype)
    norm = _norm(3072, 4, dtype)
    batch_norm, batch_sum = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
    batch_act = ops.silu_and_mul(gate_up)
    for i in (0, 1, 150, 299):
        alone_norm, alone_sum = ops.add_rms_norm(x[i:i + 1], residual[i:i + 1], norm.weight, norm.eps)
        assert torch.equal(alone_norm[0], batch_norm[i]) and torch.equal(alone_sum[0], batch_sum[i])
        assert torch.equal(ops.rms_norm(x[i:i + 1], norm.weight, norm.eps)[0], ops.rms_norm(x, norm.weight, norm.eps)[i])
        assert torch.equal(ops.silu_and_mul(gate_up[i:i + 1])[0], batch_act[i])


def test_dispatch_picks_the_library_per_dtype():
    """bf16: the AVX-512 BF16 build where it exists, else the AVX2 one; float32: the AVX2 build on CPUs whose best
    ISA is AVX2 (where it was measured), the plain torch ops elsewhere; other dtypes: plain."""
    bf16, f32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    want_bf16 = "xgenmm_cpu" if load(AVX512_BF16) else "xgenmm_avx2" if load(AVX2_INT8) else None
    want_f32 = "xgenmm_avx2" if load(AVX2_INT8) and torch.backends.cpu.get_cpu_capability() == "AVX2" else None
    assert cpu_fused_ops._namespace(torch.bfloat16) == want_bf16 and cpu_fused_ops.supported(bf16) == (want_bf16 is not None)
    assert cpu_fused_ops._namespace(torch.float32) == want_f32 and cpu_fused_ops.supported(f32) == (want_f32 is not None)
    assert not cpu_fused_ops.supported(torch.zeros(1, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoder_uses_them_and_matches_the_plain_path(tiny_checkpoint, dtype):
    """auto picks the C++ ops where `supported`; hidden states and the KV cache stay within the plain torch path's
    roundings (only the norms' reduction order and exp's last ulp differ)."""
    from xgenmm.checkpoint import load_model

    if not cpu_fused_ops.supported(torch.zeros(1, dtype=dtype)):
        pytest.skip(f"no fused {dtype} ops on this CPU (the plain path is the only one)")
    model = load_model(tiny_checkpoint, "cpu", dtype)
    decoder = model.language_model
    assert decoder.fused_ops_for(torch.zeros(1, dtype=dtype)) is cpu_fused_ops
    results = decoder_runs(model, ("off", "auto"), dtype)
    (h_on, c_on), (h_off, c_off) = results["auto"], results["off"]
    if dtype == torch.bfloat16:
        assert _ulps(h_on, h_off) <= 2
        for (k_on, v_on), (k_off, v_off) in zip(c_on, c_off):
            assert _ulps(k_on, k_off) <= 2 and _ulps(v_on, v_off) <= 2
    else:
        torch.testing.assert_close(h_on, h_off, rtol=1e-5, atol=1e-5)
        for (k_on, v_on), (k_off, v_off) in zip(c_on, c_off):
            torch.testing.assert_close(k_on, k_off, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v_on, v_off, rtol=1e-5, atol=1e-5)
