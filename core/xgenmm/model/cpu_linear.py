"""Linear layers on CPU: oneDNN (float32; the bf16 vision tower) and our batch-invariant bf16 kernels (language model).

Why oneDNN: eager `F.linear` on CPU goes through a plain sgemm that is slow for the skinny matrices of decoding.
oneDNN (`torch.ops.mkldnn._linear_pointwise`, the GEMM that torch.compile's and vLLM's CPU backends use) is 1.5-2.7x
faster in float32 at decode sizes and never slower (`benchmarks/cpu_linear.py`, results/cpu_linear.json); in bf16 on
CPUs with native bf16 (AMX / AVX-512 BF16) it runs the vision tower's large batches at ~4x the float32 rate.

Why our own bf16 kernels for the language model (`cpu_kernels/csrc/`): at decode sizes a linear layer is one pass
over its weight, and oneDNN's bf16 path reads a plain weight at ~40-60% of the memory bandwidth; ours, on weights
packed once at load (`PackedBf16Linear`), streams it at ~85-90%. And ours computes every output row the same way
whatever the batch, while oneDNN computes a single row with another kernel than a batch: in bf16 that difference (one
rounding step in ~1e-4 of the outputs) changes greedy tokens, so a request's output would depend on what it was
batched with, or on whether its tokens were decoded or recomputed after a preemption. The LM head keeps its plain
[vocab, hidden] weight (the engine and the reference read it) and runs our plain-layout kernel
(`bf16_kernel_linear`), also batch-invariant. The vision tower keeps oneDNN: its batches are always hundreds of rows
(oneDNN gives every row the same result from 2 rows up) and oneDNN is faster there.

Why our own float32 kernel for the language model on AVX2 CPUs (where `dtype="auto"` is float32: no native bf16):
oneDNN reads a plain float32 weight well for one row but at 1.5-2.5x the time for the 2-16 rows of a few streams
decoding together; ours (`PackedF32Linear`, csrc/linear_f32_avx2.cpp) streams a weight packed once at load at
24-29 GB/s for 1-4 rows on a ~28 GB/s machine, matches oneDNN at prefill sizes, and is batch-invariant like the bf16
one. The LM head stays on oneDNN with its plain weight.

`use_onednn_linears(module)` switches every `nn.Linear` inside a loaded module to oneDNN (parameters untouched);
`use_packed_bf16_linears(module)` / `use_packed_f32_linears(module)` replace them with `PackedBf16Linear` /
`PackedF32Linear` (state dicts still hold the plain weights: they are unpacked when saved and packed when loaded). `onednn_linear(x, w, b)` and
`bf16_kernel_linear(x, w, b)` are the functional forms, used for the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu_features import cpu_features


def onednn_linear_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """oneDNN linears run on CPU in float32, and in bfloat16 where the CPU computes it natively (CUDA has cuBLAS)."""
    features = cpu_features()
    if torch.device(device).type != "cpu" or not features.onednn_linear:
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and features.computes_bf16


def bf16_kernel_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Our bf16 linear kernel applies (bf16 on CPU) and is built / loaded (`xgenmm.cpu_kernels`)."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return False
    from .. import cpu_kernels

    return cpu_kernels.available()


def f32_kernel_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Our packed float32 kernel runs the language model: float32 on a CPU whose best vector ISA torch reports as
    AVX2, with the AVX2 library built (`xgenmm.cpu_kernels`). Measured there (Zen 3, 2 threads, full-size Phi-3
    shapes): 1.1-1.2x oneDNN's rate at one row, 1.3-2.2x at 2-16 rows (a few streams decoding together), level with
    it at prefill sizes (32-700 rows); on AVX-512 CPUs it has not been measured, so oneDNN keeps them."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX2":
        return False
    from .. import cpu_kernels

    return cpu_kernels.int8_available()


def _training(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if _training(x, weight):
        return F.linear(x, weight, bias)  # the oneDNN op has no autograd formula; training keeps ATen's
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def bf16_kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Our batch-invariant bf16 kernel on a plain [N, K] weight (the LM head)."""
    if _training(x, weight) or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return F.linear(x, weight, bias)
    return torch.ops.xgenmm_cpu.linear_bf16(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose forward runs on oneDNN (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored packed for one of our kernels; `weight` unpacks on access (a copy) and
    the state dict holds the plain weight, so saving, loading and copying into other models (e.g.
    `reference.build_hf_language_model`) see an ordinary `nn.Linear`. Subclasses name the dtype and the ops."""

    dtype: torch.dtype

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_packed = nn.Parameter(self._pack_owned(linear.weight.detach()), requires_grad=False)
        self.bias = linear.bias

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pack_owned(self, weight: torch.Tensor) -> torch.Tensor:
        """Pack the weight of the layer this one replaces (nothing else holds it); may reuse its memory."""
        return self._pack(weight)

    @property
    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key].to(self.dtype)
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: {tuple(weight.shape)} vs "
                                  f"{(self.out_features, self.in_features)}")
            else:
                self.weight_packed.data = self._pack(weight)
        elif strict:
            missing_keys.append(key)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            elif strict:
                missing_keys.append(prefix + "bias")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedBf16Linear(PackedLinear):
    """A bf16 linear layer on `torch.ops.xgenmm_cpu.linear_bf16_packed` (AVX-512 BF16)."""

    dtype = torch.bfloat16

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.xgenmm_cpu.pack_bf16_weight(weight)

    @property
    def weight(self) -> torch.Tensor:
        return torch.ops.xgenmm_cpu.unpack_bf16_weight(self.weight_packed, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.xgenmm_cpu.linear_bf16_packed(x, self.weight_packed, self.bias, self.out_features)


class PackedF32Linear(PackedLinear):
    """A float32 linear layer on `torch.ops.xgenmm_avx2.linear_f32` (AVX2 + FMA; csrc/linear_f32_avx2.cpp)."""

    dtype = torch.float32

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.xgenmm_avx2.pack_f32_weight(weight)

    def _pack_owned(self, weight: torch.Tensor) -> torch.Tensor:
        # rewritten in place where the layout allows (every Phi-3 width does): no second copy of the weight while
        # the model loads, and none of a fresh allocation's page faults (5x faster at full size)
        if weight.is_contiguous() and weight.shape[0] % 64 == 0:
            return torch.ops.xgenmm_avx2.pack_f32_weight_(weight)
        return self._pack(weight)

    @property
    def weight(self) -> torch.Tensor:
        return torch.ops.xgenmm_avx2.unpack_f32_weight(self.weight_packed, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.xgenmm_avx2.linear_f32(x, self.weight_packed, self.bias, self.out_features)


def _switch(module: nn.Module, cls: type[nn.Linear]) -> int:
    count = 0
    for sub in module.modules():
        if type(sub) in (nn.Linear, OneDNNLinear) and type(sub) is not cls:
            sub.__class__ = cls
            count += 1
    return count


def use_onednn_linears(module: nn.Module) -> int:
    """Switch every linear layer inside `module` to `OneDNNLinear` in place; returns how many were switched."""
    return _switch(module, OneDNNLinear)


def use_aten_linears(module: nn.Module) -> int:
    """Switch `module`'s oneDNN linear layers back to plain `nn.Linear` (ATen's GEMM); returns how many."""
    return _switch(module, nn.Linear)


def vision_prefers_aten(dtype: torch.dtype) -> bool:
    """float32 on a CPU whose best vector ISA torch reports as AVX2: there ATen's sgemm ran the vision tower's shapes
    (hundreds to thousands of rows) 1.03-1.15x faster than oneDNN (AMD Zen 3, 2 threads, 4 interleaved rounds:
    SigLIP fc1 / fc2 / qkv on 5 crops 1.15 / 1.10 / 1.13x, the perceiver's feed-forward 1.03x), while oneDNN stays
    1.2-2x faster at decode sizes, so only the vision tower moves. On AVX-512 CPUs oneDNN was never slower."""
    return dtype == torch.float32 and torch.backends.cpu.get_cpu_capability() == "AVX2"


def _use_packed_linears(module: nn.Module, cls: type[PackedLinear]) -> int:
    names = [name for name, sub in module.named_modules()
             if type(sub) in (nn.Linear, OneDNNLinear) and sub.weight.dtype == cls.dtype]
    for name in names:  # hold no reference to a replaced layer: its plain weight is freed as soon as it is packed
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, cls(getattr(parent, attr)))
    return len(names)


def use_packed_bf16_linears(module: nn.Module) -> int:
    """Replace every bf16 linear layer inside `module` by a `PackedBf16Linear` (one layer's weight packed at a time,
    the plain copy freed); returns how many were replaced."""
    return _use_packed_linears(module, PackedBf16Linear)


def use_packed_f32_linears(module: nn.Module) -> int:
    """Replace every float32 linear layer inside `module` by a `PackedF32Linear` (as `use_packed_bf16_linears`)."""
    return _use_packed_linears(module, PackedF32Linear)
