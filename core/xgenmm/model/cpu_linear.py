"""Linear layers on oneDNN on CPU (float32), the GEMM that torch.compile's CPU backend and vLLM's CPU backend use.

Why: eager `F.linear` on CPU goes through a plain sgemm that is slow for the skinny matrices of decoding. On the
2-core CI CPUs `torch.ops.mkldnn._linear_pointwise` is 1.7x faster for the LM head at decode batch 16
(16 x 384 x 32015: 7.5 -> 4.3 ms; 2.5x at batch 1), 2.7x for a full-size gate_up at batch 16, 1.04-1.2x on the
prefill / perceiver / SigLIP shapes, and never slower (`benchmarks/cpu_linear.py`, results/cpu_linear.json). It is the same float32 math; only the summation order
differs (rounding-level differences, ~1e-7 relative), and the fixture and transformers parity tests run on it.

`use_onednn_linears(model)` switches every `nn.Linear` of a loaded model (parameters untouched, so state dicts and
weight tying are unaffected); `onednn_linear(x, w, b)` is the functional form, used for the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def onednn_linear_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """oneDNN linears are used for float32 on CPU only (CUDA has cuBLAS; CPU bf16 is not what we run)."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return F.linear(x, weight, bias)  # the oneDNN op has no autograd formula; training keeps ATen's
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose forward runs on oneDNN (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


def use_onednn_linears(module: nn.Module) -> int:
    """Switch every plain `nn.Linear` inside `module` to `OneDNNLinear` in place; returns how many were switched."""
    count = 0
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = OneDNNLinear
            count += 1
    return count
