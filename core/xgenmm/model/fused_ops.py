"""Fused small ops of the Phi-3 decoder as Triton kernels, used on CUDA (bf16 on CPU has its C++ twin, `cpu_fused_ops.py`).

Why: under CUDA graphs a decode step's cost is the weight reads plus one short kernel per op. The eager decoder
runs about 40 kernels per layer (a bf16 RMSNorm is 8 elementwise kernels, rotate-half RoPE ~14); these
kernels bring a layer down to ~11: norm, qkv GEMM, RoPE, KV store, attention (+ split merge), o_proj GEMM,
add+norm, gate_up GEMM, SiLU*mul, down GEMM.

Each kernel reproduces the roundings of the transformers ops it replaces, in any dtype: a bf16 product or sum is
computed in fp32 and rounded to bf16 at the same points as `torch` (`residual + x` rounded before the norm,
`x * rsqrt(var + eps)` rounded before the weight multiply, each RoPE product rounded before the sum, SiLU rounded
before the multiply by `up`). Only reduction order (the norm's mean) and libm ulps differ. Every launch passes
`enable_fp_fusion=False`: otherwise the GPU compiler sees through a round trip to bf16, computes in bf16 and
contracts a product into the following sum (`fma.rn.bf16`: one rounding where torch has two), which on an H200
made RoPE differ from torch by one bf16 step of its largest values while the interpreter saw none.

* `rms_norm(x, weight, eps)`: transformers' Phi3RMSNorm.
* `add_rms_norm(x, residual, weight, eps) -> (normed, x + residual)`: the residual add fused into the next norm.
* `silu_and_mul(gate_up) -> up * silu(gate)` (gate = first half of the last dimension, as `chunk(2)`).
* `rotary_embedding_(positions, q, k, cos_sin, rotary_dim)`: rotate-half RoPE in place on q [T, H, D] and
  k [T, Hkv, D] (strided views into the qkv projection are fine), cos/sin cast to the input dtype first as HF does.

Tested against the torch ops under TRITON_INTERPRET=1 (`tests/test_fused_ops.py`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supported(x: torch.Tensor) -> bool:
    """Whether these kernels can run on `x` (CUDA, or the CPU interpreter in tests)."""
    return x.is_cuda or interpreting()


# --------------------------------------------------------------------------------------------------------------
# rounding helper
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _round(x, dt: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 `x` rounded to `dt` (round to nearest even), returned as fp32.

    Triton 3.5's CPU interpreter truncates fp32 -> bf16 casts, so tests set EMULATE_BF16 and round with integer
    ops instead (the GPU path is the native cvt.rn)."""
    if EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dt).to(tl.float32)


def _emulate_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreting()

# --------------------------------------------------------------------------------------------------------------
# RMSNorm (+ residual add)
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    res_out_ptr,
    w_ptr,
    out_ptr,
    x_stride,
    res_stride,
    res_out_stride,
    out_stride,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt: tl.constexpr = x_ptr.dtype.element_ty
    out_dt: tl.constexpr = out_ptr.dtype.element_ty
    xf = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        xf = _round(r + xf, dt, EMULATE_BF16)  # residual + x, rounded like torch's add
        tl.store(res_out_ptr + row * res_out_stride + cols, xf.to(dt), mask=mask)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = _round(xf * tl.rsqrt(var + eps), dt, EMULATE_BF16)  # HF: (x * rsqrt(var + eps)).to(input dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = _round(w * normed, out_dt, EMULATE_BF16)  # HF: weight * normed, in the promoted dtype
    tl.store(out_ptr + row * out_stride + cols, out.to(out_dt), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_launch(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    return block, (4 if block <= 1024 else 8 if block <= 4096 else 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Phi3RMSNorm: `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`."""
    x2 = _rows(x)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        block, warps = _norm_launch(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](
            x2, x2, x2, weight, out, x2.stride(0), 0, 0, out.stride(0), x2.shape[1], float(eps),
            HAS_RESIDUAL=False, BLOCK=block, EMULATE_BF16=_emulate_bf16(x.dtype), num_warps=warps,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`rms_norm(residual + x)`, `residual + x`) in one pass; the sum is rounded to x's dtype first, as HF does."""
    if residual.dtype != x.dtype or residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype} vs residual {tuple(residual.shape)} {residual.dtype}")
    x2, r2 = _rows(x), _rows(residual)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    new_residual = torch.empty_like(x2)
    if x2.shape[0]:
        block, warps = _norm_launch(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, new_residual, weight, out, x2.stride(0), r2.stride(0), new_residual.stride(0), out.stride(0),
            x2.shape[1], float(eps), HAS_RESIDUAL=True, BLOCK=block, EMULATE_BF16=_emulate_bf16(x.dtype),
            num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out.view(x.shape), new_residual.view(x.shape)


# --------------------------------------------------------------------------------------------------------------
# SiLU(gate) * up
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, n_cols, BLOCK: tl.constexpr,
                         EMULATE_BF16: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt: tl.constexpr = x_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = _round(g / (1.0 + tl.exp(-g)), dt, EMULATE_BF16)  # F.silu in the input dtype
    out = _round(up * act, dt, EMULATE_BF16)
    tl.store(out_ptr + row * out_stride + cols, out.to(dt), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`gate, up = gate_up.chunk(2, -1); up * F.silu(gate)`."""
    x2 = _rows(gate_up)
    n = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
            x2, out, x2.stride(0), out.stride(0), n, BLOCK=block, EMULATE_BF16=_emulate_bf16(gate_up.dtype),
            num_warps=4, enable_fp_fusion=False,
        )
    return out.view(*gate_up.shape[:-1], n)


# --------------------------------------------------------------------------------------------------------------
# rotate-half RoPE, in place
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(base_ptr, stride_h, num_heads, cos, sin, HALF: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF_PAD: tl.constexpr, EMULATE_BF16: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    ptr1 = base_ptr + heads * stride_h + dims
    dt: tl.constexpr = base_ptr.dtype.element_ty
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    # HF: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1); every product rounded to the dtype.
    out1 = _round(_round(x1 * cos, dt, EMULATE_BF16) - _round(x2 * sin, dt, EMULATE_BF16), dt, EMULATE_BF16)
    out2 = _round(_round(x2 * cos, dt, EMULATE_BF16) + _round(x1 * sin, dt, EMULATE_BF16), dt, EMULATE_BF16)
    tl.store(ptr1, out1.to(dt), mask=mask)
    tl.store(ptr1 + HALF, out2.to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cos_sin_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    cs_stride_kind,
    cs_stride_pos,
    num_q_heads,
    num_k_heads,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    QH_PAD: tl.constexpr,
    KH_PAD: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    dmask = dims < HALF
    dt: tl.constexpr = q_ptr.dtype.element_ty
    # emb = cat(freqs, freqs): the first half of the table row serves both halves; HF casts it to the dtype first
    cos = tl.load(cos_sin_ptr + pos * cs_stride_pos + dims, mask=dmask, other=0.0)
    sin = tl.load(cos_sin_ptr + cs_stride_kind + pos * cs_stride_pos + dims, mask=dmask, other=0.0)
    cos = _round(cos, dt, EMULATE_BF16)[None, :]
    sin = _round(sin, dt, EMULATE_BF16)[None, :]
    _rotate_heads(q_ptr + t * q_stride_t, q_stride_h, num_q_heads, cos, sin, HALF, QH_PAD, HALF_PAD, EMULATE_BF16)
    _rotate_heads(k_ptr + t * k_stride_t, k_stride_h, num_k_heads, cos, sin, HALF, KH_PAD, HALF_PAD, EMULATE_BF16)


def rotary_embedding_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first `rotary_dim` dims of every head of q [T, H, D] and k [T, Hkv, D] in place.

    `cos_sin` is the float32 `[2, max_positions, rotary_dim]` table (cos, sin of `cat(freqs, freqs)`).
    """
    if q.stride(-1) != 1 or k.stride(-1) != 1 or q.dtype != k.dtype:
        raise ValueError("rotary_embedding_: q and k need the same dtype and a contiguous last dimension")
    if cos_sin.stride(-1) != 1 or rotary_dim % 2 or rotary_dim > q.shape[-1]:
        raise ValueError(f"rotary_embedding_: bad table {tuple(cos_sin.shape)} / rotary_dim {rotary_dim}")
    num_tokens = q.shape[0]
    if num_tokens:
        half = rotary_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin.stride(0), cos_sin.stride(1), q.shape[1], k.shape[1],
            HALF=half, HALF_PAD=triton.next_power_of_2(half), QH_PAD=triton.next_power_of_2(q.shape[1]),
            KH_PAD=triton.next_power_of_2(k.shape[1]), EMULATE_BF16=_emulate_bf16(q.dtype), num_warps=4,
            enable_fp_fusion=False,
        )  # fmt: skip
    return q, k
