"""The Phi-3 decoder's small ops fused on CPU: the same interface and roundings as `fused_ops.py` (Triton, CUDA), on
our C++ kernels: `cpu_kernels/csrc/fused_ops.cpp` (bf16, AVX-512 BF16 CPUs) and `fused_ops_avx2.cpp` (float32 and
bf16, AVX2 CPUs).

Why: a full-size single-stream decode step is a pass over the weights, and the plain torch path adds ~40 small ops
per layer (norms, RoPE with its table lookups, SiLU*mul, residual adds) that cost ~4-6% of the step in dispatch and
allocations. With these a layer is ~11 calls, as on CUDA. Used (`Phi3Decoder.fused_ops_for`) for bf16 CPU tensors
where either library is built, and for float32 on CPUs whose best vector ISA is AVX2 (where it was measured; in
float32 RoPE is bit-identical to the plain ops, SiLU within exp's last ulp, the norms differ only in reduction
order). float32 on AVX-512 CPUs keeps the plain torch ops.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _namespace(dtype: torch.dtype) -> str | None:
    """The op namespace that runs `dtype` here, or None for the plain torch ops."""
    from .. import cpu_kernels
    from .cpu_linear import f32_kernel_available

    if dtype == torch.bfloat16:
        return "xgenmm_cpu" if cpu_kernels.available() else "xgenmm_avx2" if cpu_kernels.int8_available() else None
    # float32: where the LM's linears run our AVX2 kernel (AVX2-best CPUs, the AVX2 library built)
    return "xgenmm_avx2" if f32_kernel_available("cpu", dtype) else None


def supported(x: torch.Tensor) -> bool:
    """CPU tensors of a dtype one of our libraries runs here (see the module docstring)."""
    return x.device.type == "cpu" and _namespace(x.dtype) is not None


def _ops(x: torch.Tensor):
    return getattr(torch.ops, _namespace(x.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Phi3RMSNorm: `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`."""
    return _ops(x).rms_norm(x, weight, float(eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`rms_norm(residual + x)`, `residual + x`) in one pass; the sum rounded to bf16 first, as HF does."""
    if residual.dtype != x.dtype or residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype} vs residual {tuple(residual.shape)} {residual.dtype}")
    return _ops(x).add_rms_norm(x, residual, weight, float(eps))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`gate, up = gate_up.chunk(2, -1); up * F.silu(gate)`."""
    return _ops(gate_up).silu_and_mul(gate_up)


def rotary_embedding_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
                      rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first `rotary_dim` dims of every head of q [T, H, D] and k [T, Hkv, D] in place (strided views
    into the qkv projection are fine); `cos_sin` is the float32 `[2, max_positions, rotary_dim]` table."""
    _ops(q).rotary_embedding_(positions, q, k, cos_sin, rotary_dim)
    return q, k
