"""int8 weight-only GEMM for CUDA in Triton: y[M, N] = (x[M, K] @ q[N, K]^T) * scale[N] (+ bias[N]).

Why our own kernel: ATen's `_weight_int8pack_mm` has no CUDA kernel, and fp8 (`torch._scaled_mm`) needs compute
capability >= 8.9; this one serves int8 weights on every GPU Triton targets (compute capability >= 8.0: Ampere, Ada,
Hopper, and later; `loading.CUDA_MIN_CAPABILITY` refuses older GPUs), half the weight bytes of bf16 per decode step.

How: the activations (bf16 or fp16) and the int8 weights are read a [BLOCK_M, BLOCK_K] / [BLOCK_K, BLOCK_N] tile at a
time; the int8 tile is converted to the activations' dtype in registers (exact: |q| <= 127), multiplied on the tensor
cores with float32 accumulation, and the per-output-channel scale (then the bias) is applied once, in float32, to the
accumulator before the single rounding to the output dtype. No dequantized weight is ever written to memory.

Batch invariance: the tile shapes, the warp count and the K loop are fixed (`LAUNCH`), whatever M, so every output
row is the same instruction sequence over the same K order, whichever rows share its tile or how many there are;
rows past M are masked to zero and never mix with the others. M is not specialised on (`do_not_specialize`), so M = 1
and M = 16 run the very same compiled kernel. There is no split-K: a row's sum is one program's loop, deterministic.
BLOCK_M = 16 keeps decode (1-16 rows) cheap; N is split across programs (grid axis 1) and the M tiles of one N tile
are neighbours in launch order (grid axis 0), so at prefill sizes they reread that weight tile from L2, not DRAM.

Under TRITON_INTERPRET=1 (CPU tests) Triton 3.5's interpreter computes bf16 `tl.dot` wrongly and truncates fp32 ->
bf16 casts, so the wrapper sets UPCAST_DOT and EMULATE_BF16 (round to nearest even with integer ops, as
`fused_ops._round`). UPCAST_DOT computes the tile product as fp32 products summed per output (the bf16 / fp16 x int8
products are exact in fp32; only the summation order differs from the tensor cores), not as `tl.dot`: the
interpreter's fp32 `tl.dot` is numpy's matmul, whose BLAS orders a row's sum by the row's slot in the tile (1-ulp
differences measured), a CPU artifact that would hide the kernel's own batch invariance from the tests.
Tested: tests/model/test_triton_int8.py (math, batch invariance, and PTX for sm_80 / sm_90 compiled without a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...attention.triton_kernels import _prepare_launch, interpreting
from ..fused_ops import _round

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Int8GemmLaunch:
    """The one launch configuration, for every M (changing any of it with M would break batch invariance)."""

    block_m: int = 16  # decode batches are 1-16 rows; tl.dot needs every tile dim >= 16
    block_n: int = 64
    # Decode is a stream of the weight: the bytes in flight across the GPU are N x num_stages x block_k whatever
    # block_n (a 3072-wide layer: 2.4 MB, about what an H100's bandwidth x latency needs); compiled for sm_80 / sm_90
    # the loads are pipelined with cp.async in 48 KiB of shared memory, under the 99 KiB of sm_86 / sm_89 (tested).
    # Chosen from that arithmetic, not yet timed on a GPU.
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3


LAUNCH = Int8GemmLaunch()


@triton.jit(do_not_specialize=["M"])
def _int8_weight_only_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    x_stride,
    q_stride,
    out_stride,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    dt: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None] * x_stride + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        q = tl.load(q_ptr + cols[None, :] * q_stride + ks[:, None], mask=k_mask[:, None] & col_mask[None, :],
                    other=0)  # [BLOCK_K, BLOCK_N] int8, converted in registers below
        if UPCAST_DOT:  # the interpreter: each output's own sum (numpy's matmul orders it by the row's tile slot)
            acc += tl.sum(x.to(tl.float32)[:, :, None] * q.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(x, q.to(dt), acc)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    y = acc * scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_dt: tl.constexpr = out_ptr.dtype.element_ty
    if out_dt != tl.float32:
        y = _round(y, out_dt, EMULATE_BF16)
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], y.to(out_dt),
             mask=row_mask[:, None] & col_mask[None, :])


def int8_weight_only_linear(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor,
                            bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`(x @ weight_int8.T) * scales (+ bias)` with float32 accumulation; x [..., K] in bf16 / fp16, weight_int8
    [N, K] int8, scales [N] float32, bias [N] any float dtype (added in float32); output [..., N] in `out_dtype`
    (default x's dtype; float32 allowed)."""
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"int8_weight_only_linear: activations must be bf16 or fp16, got {x.dtype}")
    if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2 or weight_int8.shape[1] != x.shape[-1]:
        raise ValueError(f"int8_weight_only_linear: weight must be int8 [N, {x.shape[-1]}], got "
                         f"{weight_int8.dtype} {tuple(weight_int8.shape)}")
    n, k = weight_int8.shape
    if scales.dtype != torch.float32 or scales.shape != (n,):
        raise ValueError(f"int8_weight_only_linear: scales must be float32 [{n}], got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"int8_weight_only_linear: bias must be [{n}], got {tuple(bias.shape)}")
    out_dtype = out_dtype or x.dtype
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = weight_int8 if weight_int8.stride(-1) == 1 else weight_int8.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m and n:
        _prepare_launch()  # the interpreter's runtime-bound `range` fix (a no-op on the GPU)
        interp = interpreting()
        grid = (triton.cdiv(m, LAUNCH.block_m), triton.cdiv(n, LAUNCH.block_n))
        bias_arg = bias.contiguous() if bias is not None else scales  # any pointer: HAS_BIAS=False never reads it
        _int8_weight_only_kernel[grid](
            x2, q, scales.contiguous(), bias_arg, out, m, n, k, x2.stride(0), q.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=LAUNCH.block_m, BLOCK_N=LAUNCH.block_n, BLOCK_K=LAUNCH.block_k,
            UPCAST_DOT=interp, EMULATE_BF16=interp and out_dtype == torch.bfloat16,
            num_warps=LAUNCH.num_warps, num_stages=LAUNCH.num_stages, enable_fp_fusion=False,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)
