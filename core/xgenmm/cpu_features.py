"""What this CPU can compute, probed once through torch (never parsed from /proc, never assumed).

The one place that asks: the automatic dtype (`placement.resolve_dtype`: bf16 only where the CPU computes it
natively), the C++ kernels' build gates (`cpu_kernels/build.py`: AVX-512 BF16; AVX2 + FMA for the int8 linear) and
the oneDNN linears (`model/cpu_linear.py`) all read `cpu_features()`.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU capabilities xgenmm's CPU paths depend on, as this torch build reports them."""

    x86_64: bool
    avx512_bf16: bool  # VDPBF16PS / VCVTNEPS2BF16: Cooper Lake, Sapphire Rapids, AMD Zen 4 and later
    amx_tile: bool  # Intel AMX (Sapphire Rapids and later)
    onednn_linear: bool  # torch was built with oneDNN (mkldnn) and has its linear op
    onednn_bf16: bool  # oneDNN is available and reports native bf16 support
    avx2_fma: bool = False  # AVX2 + FMA3 + F16C: every x86-64 since Haswell / Zen (our int8 kernels' baseline)

    @property
    def computes_bf16(self) -> bool:
        """Native bf16 arithmetic that oneDNN uses: there bf16 matmuls run ~4x faster than float32
        (benchmarks/cpu_linear.py); elsewhere they are emulated and far slower, so "auto" stays float32."""
        return (self.amx_tile or self.avx512_bf16) and self.onednn_bf16

    @property
    def runs_bf16_kernels(self) -> bool:
        """Our C++ kernels (`xgenmm.cpu_kernels`) are compiled for AVX-512 BF16 on x86-64."""
        return self.x86_64 and self.avx512_bf16

    @property
    def runs_avx2_kernels(self) -> bool:
        """Our AVX2 kernels (`xgenmm.cpu_kernels`' int8 linear) are compiled for AVX2 + FMA + F16C on x86-64."""
        return self.x86_64 and self.avx2_fma


def _probe(name: str) -> bool:
    return bool(getattr(torch.cpu, name, lambda: False)())


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's `CpuFeatures` (probed on first use, then cached: a CPU does not change under a process)."""
    mkldnn = torch.backends.mkldnn.is_available()
    caps = dict(torch.cpu.get_capabilities()) if hasattr(torch.cpu, "get_capabilities") else {}
    return CpuFeatures(
        x86_64=platform.machine() in ("x86_64", "AMD64"),
        avx512_bf16=_probe("_is_avx512_bf16_supported"),
        amx_tile=_probe("_is_amx_tile_supported"),
        onednn_linear=mkldnn and hasattr(torch.ops.mkldnn, "_linear_pointwise"),
        onednn_bf16=mkldnn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        avx2_fma=all(bool(caps.get(flag)) for flag in ("avx2", "fma3", "f16c")),
    )


def cpu_computes_bf16() -> bool:
    """True when this CPU computes bf16 natively (AMX tiles or AVX-512 BF16) and oneDNN can use it."""
    return cpu_features().computes_bf16


__all__ = ["CpuFeatures", "cpu_computes_bf16", "cpu_features"]
