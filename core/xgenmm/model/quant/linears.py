"""Weight-only quantized linear layers: int8 (CPU: our AVX2 kernel, else ATen's; CUDA: our Triton kernel,
`triton_int8.py`), int4 (CPU, ATen's kernel) and fp8 (E4M3, `torch._scaled_mm`).

int8 on x86-64 with AVX2 + FMA (`xgenmm.cpu_kernels.int8_available()`): our kernel (`cpu_kernels/csrc/
int8_linear_avx2.cpp`) on the weight packed once at load into 64-output panels; it takes bf16 or float32 activations
as they are, accumulates in float32, applies the per-channel scale and the bias in float32 and rounds once to the
activations' dtype. On the AVX2 EPYC the project tests on it ran 1.2-4.9x faster than ATen's int8 kernel at 1-16
rows on one thread, 1.7-2.6x at 700 (benchmarks/results/quantization_kernels*.json). Elsewhere (or with XGENMM_CPU_KERNELS=0) int8 runs ATen's
`_weight_int8pack_mm`. int4 runs ATen's `_weight_int4pack_mm_for_cpu`.

These int8 / int4 kernels compute an output row from that row alone (ours: one fixed float32 FMA chain per output
whatever the batch), so a request's tokens never depend on what it is batched with (tests/model/test_quantization.py
checks it bit for bit); `_scaled_mm` (fp8) does not promise it (on CPU at full widths its rows change with the batch:
benchmarks/results/quantization_kernels.json). ATen's int8 / int4 CPU kernels run fast only with bf16 activations
(float32 ones took 5-15x longer than bf16 on the AVX2 machine the project tests on: benchmarks/quantization_cpu.py),
so activations enter them in bf16 whatever the model dtype; they accumulate in float32 and the per-channel scale and
the bias are applied in float32 before the result is cast back to the model dtype.

Each layer keeps its quantized tensors as buffers (so `.to(device)` moves them and `state_dict` saves them) and
builds empty from its shapes (`empty`), which the quantized-weights cache fills (`quant/cache.py`) before calling
`finish_loading()`. A packed int8 layer's state dict still holds the plain int8 [N, K] weight (unpacked when saved,
packed again when loaded), so the cache's format does not depend on the CPU that wrote it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ...errors import QuantizationError
from ...cpu_features import cpu_features
from ..cpu_linear import onednn_linear, onednn_linear_available

INT4_GROUP_SIZES = (128, 64, 32)  # ATen's int4 CPU kernel takes 32 / 64 / 128 / 256; 128 is the usual RTN choice
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class QuantizedLinear(nn.Module):
    """Common shape / bias handling: `forward` flattens leading dims, runs `_matmul` on [M, K] and adds the bias."""

    method: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features))  # float32 [M, out_features]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish_loading(self) -> None:
        """Called once the buffers hold the weights (`from_weight`, the cache's read): lay them out for the kernel
        that will run them. Nothing to do by default."""

    def params(self) -> dict:
        """What, besides the shapes, `empty` needs to rebuild this layer (recorded in the cache's json)."""
        return {}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"method={self.method}")


QUANTIZE_ROWS_PER_CHUNK = 1024  # float32 working memory while quantizing: 1024 x K x 4 bytes (12 MiB at K=3072)


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [N, K] int8, scales [N] float32), w ~= q * scale. Rows are done a chunk at
    a time so quantizing a 16384 x 3072 layer while loading needs 12 MiB of float32, not 200 MiB (peak RSS)."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, QUANTIZE_ROWS_PER_CHUNK):
        rows = slice(start, min(start + QUANTIZE_ROWS_PER_CHUNK, n))
        w = weight[rows].detach().float()
        s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q[rows] = torch.round(w / s[:, None]).clamp_(-127, 127)  # not in place: `w` may be the weight itself
        scales[rows] = s
    return q, scales


def int8_kernel_available(device: torch.device | str) -> bool:
    """Our AVX2 int8 kernel runs on this device (CPU, x86-64 with AVX2 + FMA, built, not disabled)."""
    if torch.device(device).type != "cpu":
        return False
    from ... import cpu_kernels

    return cpu_kernels.int8_available()


class Int8WeightOnlyLinear(QuantizedLinear):
    """int8 weights with one symmetric float32 scale per output channel (w ~= q * scale, q in [-127, 127]).

    Where our int8 kernel runs, `finish_loading` replaces the plain `weight_int8` buffer by `weight_packed` (the
    same bytes in 64-output panels; the plain copy is freed): `weight_int8` then unpacks on access (a copy), and the
    state dict still holds the plain layout."""

    method = "int8"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight_int8.shape[1], weight_int8.shape[0], bias)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)  # float32 [N]
        # ATen's kernel multiplies by a bf16 scale; ones keep it exact and the real scale is applied in float32
        self.register_buffer("unit_scales", torch.ones(weight_int8.shape[0], dtype=torch.bfloat16,
                                                       device=weight_int8.device), persistent=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, **_) -> Int8WeightOnlyLinear:
        if weight.device.type == "cpu" and weight.shape[1] % 8:  # ATen's CPU kernel crashes (SIGSEGV) on such widths
            raise QuantizationError(f"int8 on CPU needs a layer width divisible by 8; this layer has {weight.shape[1]} "
                                    "inputs: use quantization=None")
        q, scales = quantize_int8_rows(weight)
        layer = cls(q, scales, None if bias is None else bias.detach().clone())
        layer.finish_loading()
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias_dtype: torch.dtype | None,
              device: torch.device | str = "cpu", **_) -> Int8WeightOnlyLinear:
        bias = None if bias_dtype is None else torch.empty(out_features, dtype=bias_dtype, device=device)
        return cls(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                   torch.empty(out_features, dtype=torch.float32, device=device), bias)

    @property
    def packed(self) -> bool:
        return "weight_packed" in self._buffers

    def finish_loading(self) -> None:
        if self.packed or not int8_kernel_available(self.scales.device):
            return
        plain = self._buffers.pop("weight_int8")
        self.register_buffer("weight_packed", torch.ops.xgenmm_avx2.pack_int8_weight(plain), persistent=False)

    def _unpack(self) -> None:
        packed = self._buffers.pop("weight_packed")
        self.register_buffer("weight_int8", torch.ops.xgenmm_avx2.unpack_int8_weight(packed, self.out_features))

    def __getattr__(self, name: str):
        if name == "weight_int8" and "weight_packed" in self.__dict__.get("_buffers", {}):
            return torch.ops.xgenmm_avx2.unpack_int8_weight(self._buffers["weight_packed"], self.out_features)
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "weight_int8"] = self.weight_int8

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not self.packed:
            return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.finish_loading()

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    def runs_triton(self) -> bool:
        """On CUDA the Triton kernel (`triton_int8.py`) runs; on CPU ours (packed) or ATen's `_weight_int8pack_mm`.
        (`scales`, not `weight_int8`: on CPU the plain weight may be packed away.)"""
        return self.scales.is_cuda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_triton():
            # one launch: scale and bias applied to the float32 accumulator, one rounding to the model dtype
            from .triton_int8 import int8_weight_only_linear  # triton is imported only where it runs (Linux + GPU)

            return int8_weight_only_linear(_triton_activations(x), self.weight_int8, self.scales, self.bias,
                                           out_dtype=x.dtype)
        if not (self.packed and x.device.type == "cpu"):
            return super().forward(x)
        if x.dtype in (torch.bfloat16, torch.float32):
            return torch.ops.xgenmm_avx2.int8_linear(x, self.weight_packed, self.scales, self.bias, self.out_features)
        return torch.ops.xgenmm_avx2.int8_linear(x.float(), self.weight_packed, self.scales, self.bias,
                                                 self.out_features).to(x.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_triton():
            from .triton_int8 import int8_weight_only_linear

            return int8_weight_only_linear(_triton_activations(x), self.weight_int8, self.scales,
                                           out_dtype=torch.float32)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.weight_int8, self.unit_scales)
        return y.float().mul_(self.scales)


def _triton_activations(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 enter the Triton kernel as they are; float32 enters in bf16, as on the CPU path."""
    return x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16)


def int4_group_size(in_features: int, preferred: int = 128) -> int:
    """The largest supported group size (at most `preferred`) that divides `in_features`."""
    for size in INT4_GROUP_SIZES:
        if size <= preferred and in_features % size == 0:
            return size
    raise QuantizationError(f"int4 needs a layer width divisible by 32 (groups of {INT4_GROUP_SIZES}); this layer "
                            f"has {in_features} inputs: use quantization='int8'")


class Int4WeightOnlyLinear(QuantizedLinear):
    """int4 weights, round-to-nearest, asymmetric per group of `group_size` inputs (w ~= (q - 8) * scale + zero,
    q in [0, 15]; scale and zero in bf16 as the kernel reads them). Rows are padded to a multiple of 16 (the kernel's
    packing needs it; the decoupled LM head has 32015) and the padding is sliced off the output."""

    method = "int4"

    def __init__(self, weight_int4: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int, group_size: int):
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        self.register_buffer("weight_int4", weight_int4)  # ATen's CPU packing: uint8 [N padded, K / 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # bf16 [K / group, N padded, 2]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 128,
                    **_) -> Int4WeightOnlyLinear:
        out_features, in_features = weight.shape
        group = int4_group_size(in_features, group_size)
        padded = _round_up(out_features, 16)
        w = torch.zeros(padded, in_features, dtype=torch.float32, device=weight.device)
        w[:out_features] = weight.detach()
        wg = w.view(padded, in_features // group, group)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-6).to(torch.bfloat16)  # rounded first: q is chosen against the
        zero = (lo + 8.0 * scale.float()).to(torch.bfloat16)  # scale / zero the kernel will actually use
        q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None] + 8.0).clamp_(0, 15)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(padded, in_features).to(torch.int32), 1)
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        return cls(packed, scales_and_zeros, None if bias is None else bias.detach().clone(), in_features,
                   out_features, group)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias_dtype: torch.dtype | None,
              device: torch.device | str = "cpu", group_size: int = 128, **_) -> Int4WeightOnlyLinear:
        padded = _round_up(out_features, 16)
        bias = None if bias_dtype is None else torch.empty(out_features, dtype=bias_dtype, device=device)
        return cls(torch.empty(padded, in_features // 2, dtype=torch.uint8, device=device),
                   torch.empty(in_features // group_size, padded, 2, dtype=torch.bfloat16, device=device), bias,
                   in_features, out_features, group_size)

    def params(self) -> dict:
        return {"group_size": self.group_size}

    def dequantize(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.weight_int4.device)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group_size, self.scales_and_zeros)
        return w.float().t()[: self.out_features].contiguous()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.weight_int4,
                                                       self.group_size, self.scales_and_zeros)
        return y[:, : self.out_features].float()


class Fp8Linear(QuantizedLinear):
    """float8 E4M3 weights with one float32 scale per output channel; activations quantized per row (token) to E4M3
    at run time, both scales applied by `torch._scaled_mm` (rowwise scaling: Hopper-class GPUs; CPU runs oneDNN's
    kernel, which tests the same logic). Rows padded to a multiple of 16 like `_scaled_mm` needs."""

    method = "fp8"

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight_fp8", weight_fp8)  # float8_e4m3fn [N padded, K]
        self.register_buffer("weight_scale", weight_scale)  # float32 [1, N padded]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, **_) -> Fp8Linear:
        out_features, in_features = weight.shape
        if in_features % 16:
            raise QuantizationError(f"fp8 needs a layer width divisible by 16; this layer has {in_features} inputs: "
                                    "use quantization=None")
        padded = _round_up(out_features, 16)
        w = torch.zeros(padded, in_features, dtype=torch.float32, device=weight.device)
        w[:out_features] = weight.detach()
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(q, scale[None, :].contiguous(), None if bias is None else bias.detach().clone(), in_features,
                   out_features)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias_dtype: torch.dtype | None,
              device: torch.device | str = "cpu", **_) -> Fp8Linear:
        padded = _round_up(out_features, 16)
        bias = None if bias_dtype is None else torch.empty(out_features, dtype=bias_dtype, device=device)
        return cls(torch.empty(padded, in_features, dtype=torch.float8_e4m3fn, device=device),
                   torch.empty(1, padded, dtype=torch.float32, device=device), bias, in_features, out_features)

    def dequantize(self) -> torch.Tensor:
        return (self.weight_fp8.float() * self.weight_scale.t())[: self.out_features]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x_scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        xq = (xf / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                             out_dtype=torch.bfloat16)
        return y[:, : self.out_features].float()


class Int8StoredLinear(Int8WeightOnlyLinear):
    """int8 weights at rest (per-output-channel scales, as `Int8WeightOnlyLinear`) for the vision tower and the
    perceiver, whose batches are hundreds of rows (729 per crop): compute-bound, so what int8 buys there is memory,
    and each layer runs on whatever is fastest at those sizes on this CPU. Where the CPU computes bf16 natively
    (AVX-512 BF16 / AMX), oneDNN's GEMM in the model dtype is: the weight is dequantized to that dtype for each call
    (one pass over a 5-20 MB weight, small against the GEMM) and run as an unquantized layer would be. Elsewhere
    (AVX2) torch's bf16 GEMM is emulated (~12-14 GFLOP/s here) and our int8 kernel is faster at every row count
    (`benchmarks/results/quantization_kernels.json`), so the weight is packed for it like the language model's."""

    method = "int8-stored"

    def finish_loading(self) -> None:
        if not cpu_features().computes_bf16:
            super().finish_loading()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and x.device.type == "cpu":
            return super().forward(x)
        weight = self.dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if onednn_linear_available(x.device, x.dtype):
            return onednn_linear(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)


QUANTIZED_LINEARS: dict[str, type[QuantizedLinear]] = {
    cls.method: cls for cls in (Int8WeightOnlyLinear, Int4WeightOnlyLinear, Fp8Linear)
}
STORED_LINEARS: dict[str, type[QuantizedLinear]] = {Int8StoredLinear.method: Int8StoredLinear}
