"""Weight-only quantized linear layers: int8 (CPU: ATen's kernel; CUDA: our Triton kernel, `triton_int8.py`), int4
(CPU, ATen's kernel) and fp8 (E4M3, `torch._scaled_mm`).

Why these kernels: they are ATen's own (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, `_scaled_mm`), kept by
torch. The int8 and int4 ones compute an output row from that row alone, so a request's tokens never depend on what
it is batched with (tests/model/test_quantization.py checks it bit for bit); `_scaled_mm` (fp8) does not promise it
(on CPU at full widths its rows change with the batch: benchmarks/results/quantization_kernels.json). ATen's int8 / int4 CPU kernels run fast only with bf16
activations (float32 ones took 5-15x longer than bf16 on the AVX2 machine the project tests on: benchmarks/
quantization_cpu.py), so activations enter them in bf16 whatever the model dtype; they accumulate in float32 and
the per-channel scale and the bias are applied in float32 before the result is cast back to the model dtype.

Each layer keeps its quantized tensors as buffers (so `.to(device)` moves them and `state_dict` saves them) and
builds empty from its shapes (`empty`), which the quantized-weights cache fills (`quant/cache.py`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ...errors import QuantizationError
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


class Int8WeightOnlyLinear(QuantizedLinear):
    """int8 weights with one symmetric float32 scale per output channel (w ~= q * scale, q in [-127, 127])."""

    method = "int8"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight_int8.shape[1], weight_int8.shape[0], bias)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)  # float32 [N]
        # the kernel multiplies by a bf16 scale; ones keep it exact and the real scale is applied in float32
        self.register_buffer("unit_scales", torch.ones(weight_int8.shape[0], dtype=torch.bfloat16,
                                                       device=weight_int8.device), persistent=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, **_) -> Int8WeightOnlyLinear:
        if weight.device.type == "cpu" and weight.shape[1] % 8:  # ATen's CPU kernel crashes (SIGSEGV) on such widths
            raise QuantizationError(f"int8 on CPU needs a layer width divisible by 8; this layer has {weight.shape[1]} "
                                    "inputs: use quantization=None")
        q, scales = quantize_int8_rows(weight)
        return cls(q, scales, None if bias is None else bias.detach().clone())

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias_dtype: torch.dtype | None,
              device: torch.device | str = "cpu", **_) -> Int8WeightOnlyLinear:
        bias = None if bias_dtype is None else torch.empty(out_features, dtype=bias_dtype, device=device)
        return cls(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                   torch.empty(out_features, dtype=torch.float32, device=device), bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    def runs_triton(self) -> bool:
        """On CUDA the Triton kernel (`triton_int8.py`) runs, on CPU ATen's `_weight_int8pack_mm`."""
        return self.weight_int8.is_cuda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_triton():
            return super().forward(x)
        # one launch: scale and bias applied to the float32 accumulator, one rounding to the model dtype
        from .triton_int8 import int8_weight_only_linear  # triton is imported only where it runs (Linux + GPU)

        return int8_weight_only_linear(_triton_activations(x), self.weight_int8, self.scales, self.bias,
                                       out_dtype=x.dtype)

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


class Int8StoredLinear(QuantizedLinear):
    """int8 weights at rest (per-output-channel scales, as `Int8WeightOnlyLinear`), dequantized to the activations'
    dtype for each call and multiplied by the same kernel an unquantized layer runs (oneDNN where it runs that dtype,
    else ATen). For the vision tower and the perceiver: their batches are hundreds of rows, compute-bound, so the
    weight-only int8 kernels would only slow them; this saves their memory (half the bytes) and leaves their compute
    as it was. Dequantizing a layer costs one pass over its weight per call, small against hundreds of rows of GEMM."""

    method = "int8-stored"

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight_int8.shape[1], weight_int8.shape[0], bias)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)  # float32 [N]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, **_) -> Int8StoredLinear:
        q, scales = quantize_int8_rows(weight)
        return cls(q, scales, None if bias is None else bias.detach().clone())

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias_dtype: torch.dtype | None,
              device: torch.device | str = "cpu", **_) -> Int8StoredLinear:
        bias = None if bias_dtype is None else torch.empty(out_features, dtype=bias_dtype, device=device)
        return cls(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                   torch.empty(out_features, dtype=torch.float32, device=device), bias)

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if onednn_linear_available(x.device, x.dtype):
            return onednn_linear(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)


QUANTIZED_LINEARS: dict[str, type[QuantizedLinear]] = {
    cls.method: cls for cls in (Int8WeightOnlyLinear, Int4WeightOnlyLinear, Fp8Linear)
}
STORED_LINEARS: dict[str, type[QuantizedLinear]] = {Int8StoredLinear.method: Int8StoredLinear}
