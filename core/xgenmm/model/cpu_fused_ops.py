"""The Phi-3 decoder's small ops fused for bf16 on CPU: the same interface and roundings as `fused_ops.py` (Triton,
CUDA), on our C++ kernels (`cpu_kernels/csrc/fused_ops.cpp`).

Why: a full-size single-stream decode step is a pass over the weights, and the plain torch path adds ~40 small ops
per layer (norms, RoPE with its table lookups, SiLU*mul, residual adds) that cost ~6% of the step in dispatch and
allocations. With these a layer is ~11 calls, as on CUDA. Used for bf16 CPU tensors where the kernels are built
(`Phi3Decoder.fused_ops_for`); float32 keeps the plain torch ops, which the parity tests pin.
"""

from __future__ import annotations

import torch


def supported(x: torch.Tensor) -> bool:
    """bf16 CPU tensors, where our kernels are built (AVX-512 BF16)."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return False
    from .. import cpu_kernels

    return cpu_kernels.available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Phi3RMSNorm: `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`."""
    return torch.ops.xgenmm_cpu.rms_norm(x, weight, float(eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`rms_norm(residual + x)`, `residual + x`) in one pass; the sum rounded to bf16 first, as HF does."""
    if residual.dtype != x.dtype or residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype} vs residual {tuple(residual.shape)} {residual.dtype}")
    return torch.ops.xgenmm_cpu.add_rms_norm(x, residual, weight, float(eps))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`gate, up = gate_up.chunk(2, -1); up * F.silu(gate)`."""
    return torch.ops.xgenmm_cpu.silu_and_mul(gate_up)


def rotary_embedding_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
                      rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first `rotary_dim` dims of every head of q [T, H, D] and k [T, Hkv, D] in place (strided views
    into the qkv projection are fine); `cos_sin` is the float32 `[2, max_positions, rotary_dim]` table."""
    torch.ops.xgenmm_cpu.rotary_embedding_(positions, q, k, cos_sin, rotary_dim)
    return q, k
