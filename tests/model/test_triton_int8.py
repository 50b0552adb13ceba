"""The Triton int8 weight-only GEMM (model/quant/triton_int8.py) under TRITON_INTERPRET=1 on CPU: against the float32
matmul on the dequantized weight for odd shapes (N and K not multiples of the tiles, M = 1, 3, 17), with and without
bias, bf16 and fp16 activations; a row's result bit for bit the same alone and inside batches of any size; the
`Int8WeightOnlyLinear` CUDA route (forced onto this kernel) against the CPU route; the CUDA capability rules of
`check_quantization`; and the kernel compiling for sm_80 / sm_90 without a GPU (tensor-core MMA, no fused FMA)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels

import pytest
import torch
import torch.nn.functional as F

for _name in ("xgenmm.model.fused_ops", "xgenmm.model.quant.triton_int8"):  # imported without the interpreter
    if _name in sys.modules:
        importlib.reload(sys.modules[_name])
from xgenmm.errors import QuantizationError  # noqa: E402
from xgenmm.model.quant import Int8WeightOnlyLinear, check_quantization  # noqa: E402
from xgenmm.model.quant.linears import quantize_int8_rows  # noqa: E402
from xgenmm.model.quant.triton_int8 import LAUNCH, int8_weight_only_linear  # noqa: E402

N, K = 70, 296  # N: one full BLOCK_N tile and a partial one; K: one full BLOCK_K step and a partial one
# (K a multiple of 8: ATen's CPU `_weight_int8pack_mm`, the route compared with below, crashes on other widths)
K_ODD = 300  # the Triton kernel takes any width (the model's are multiples of 8)
assert N % LAUNCH.block_n and K % LAUNCH.block_k and K > LAUNCH.block_k and K_ODD % 8
RTOL = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 1e-5}  # one rounding to the output dtype


def _weights(n: int = N, k: int = K, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, scales = quantize_int8_rows(torch.randn(n, k, generator=g) / k**0.5)
    return q, scales, torch.randn(n, generator=g)


def _reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), q.float() * scales[:, None], None if bias is None else bias.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_kernel_matches_the_float32_matmul_on_the_dequantized_weight(dtype, with_bias, m):
    q, scales, bias = _weights(k=K_ODD, seed=m)
    bias = bias.to(dtype) if with_bias else None
    x = torch.randn(m, K_ODD, generator=torch.Generator().manual_seed(100 + m)).to(dtype)
    want = _reference(x, q, scales, bias)
    got = int8_weight_only_linear(x, q, scales, bias)
    assert got.dtype == dtype and got.shape == (m, N)
    torch.testing.assert_close(got.float(), want, rtol=RTOL[dtype], atol=1e-5)
    got32 = int8_weight_only_linear(x, q, scales, bias, out_dtype=torch.float32)  # the accumulator, scaled
    torch.testing.assert_close(got32, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got32.to(dtype), got)  # the only rounding is the final one


def test_leading_dims_strided_input_and_empty_batch():
    q, scales, bias = _weights()
    x = torch.randn(2, 3, 2 * K).bfloat16()[..., ::2]  # a non-contiguous view
    got = int8_weight_only_linear(x, q, scales, bias)
    assert got.shape == (2, 3, N)
    assert torch.equal(got, int8_weight_only_linear(x.contiguous(), q, scales, bias))
    assert int8_weight_only_linear(torch.empty(0, K, dtype=torch.bfloat16), q, scales).shape == (0, N)


def test_bad_operands_are_refused():
    q, scales, _ = _weights()
    with pytest.raises(ValueError, match="bf16 or fp16"):
        int8_weight_only_linear(torch.randn(1, K), q, scales)
    with pytest.raises(ValueError, match="int8"):
        int8_weight_only_linear(torch.randn(1, K + 1).bfloat16(), q, scales)
    with pytest.raises(ValueError, match="float32"):
        int8_weight_only_linear(torch.randn(1, K).bfloat16(), q, scales.bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_rows_result_does_not_depend_on_the_batch(dtype):
    """Bit for bit: each row alone equals the same row inside batches of 2 to 24 rows at any offset (the tiles and
    the K loop are fixed whatever M; rows past M are masked to zero)."""
    q, scales, bias = _weights(seed=7)
    x = torch.randn(24, K, generator=torch.Generator().manual_seed(8)).to(dtype)
    alone = torch.cat([int8_weight_only_linear(x[i : i + 1], q, scales, bias) for i in range(24)])
    for start, stop in ((0, 24), (5, 22), (16, 24), (22, 24), (3, 19)):
        assert torch.equal(int8_weight_only_linear(x[start:stop], q, scales, bias), alone[start:stop]), (start, stop)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_on_the_triton_route_matches_its_cpu_route(dtype, monkeypatch):
    """`Int8WeightOnlyLinear` routes to this kernel when its weight is on CUDA; the route is forced here (the kernel
    is the real one, interpreted) and compared with ATen's CPU route, both in forward (bias fused) and `_matmul`."""
    q, scales, bias = _weights(seed=3)
    layer = Int8WeightOnlyLinear(q, scales, bias)
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(4)).to(dtype)
    zeros = torch.zeros(1, K, dtype=dtype)
    on_cpu, bias_cpu = layer(x), layer(zeros)
    cpu_matmul = layer._matmul(x.reshape(-1, K))
    monkeypatch.setattr(Int8WeightOnlyLinear, "runs_triton", lambda self: True)
    on_triton = layer(x)
    assert torch.equal(layer(zeros), bias_cpu)  # the bias exactly, rounded once to the model dtype on both routes
    assert on_triton.dtype == dtype and on_triton.shape == on_cpu.shape
    # fp16 activations stay fp16 on the Triton route (the CPU route casts them to bf16): compare with the exact result
    want = _reference(x.to(torch.bfloat16) if dtype == torch.float32 else x, q, scales, bias).reshape(2, 5, N)
    torch.testing.assert_close(on_triton.float(), want, rtol=RTOL[dtype], atol=1e-5)
    torch.testing.assert_close(on_triton.float(), on_cpu.float(), rtol=2.0**-7, atol=1e-2)
    triton_matmul = layer._matmul(x.reshape(-1, K))
    assert triton_matmul.dtype == torch.float32
    torch.testing.assert_close(triton_matmul, cpu_matmul, rtol=2.0**-7, atol=1e-2)


def test_int8_on_cpu_refuses_widths_atens_kernel_cannot_take():
    """ATen's `_weight_int8pack_mm` crashes the process (SIGSEGV) when K is not a multiple of 8: a typed error
    instead, at quantization time (the Triton kernel takes any K: K_ODD above)."""
    with pytest.raises(QuantizationError, match="divisible by 8.*300"):
        Int8WeightOnlyLinear.from_weight(torch.randn(16, K_ODD), None)
    assert Int8WeightOnlyLinear.from_weight(torch.randn(16, K), None).in_features == K


def test_cuda_capability_rules():
    assert check_quantization("int8", "cuda", capability=(8, 0)) == "int8"  # A100
    assert check_quantization("int8", "cuda", capability=(8, 6)) == "int8"  # RTX 30xx / A10
    assert check_quantization("int8", "cuda", capability=(9, 0)) == "int8"  # H100 / H200
    assert check_quantization("fp8", "cuda", capability=(8, 9)) == "fp8"  # L4 / RTX 40xx
    with pytest.raises(QuantizationError, match=r"'int8' \(compute capability >= 8.0\).*7.5.*quantization=None"):
        check_quantization("int8", "cuda", capability=(7, 5))  # T4: Triton does not target it
    with pytest.raises(QuantizationError, match=r"fp8 tensor cores.*8.0.*use quantization='int8'"):
        check_quantization("fp8", "cuda", capability=(8, 0))  # A100: no fp8, int8 offered instead
    with pytest.raises(QuantizationError, match=r"CPU only.*'int8'.*'fp8'"):
        check_quantization("int4", "cuda", capability=(9, 0))


def test_cuda_capability_is_asked_of_the_device(monkeypatch):
    asked = []

    def capability(device):
        asked.append(device)
        return (7, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    with pytest.raises(QuantizationError, match="7.0"):
        check_quantization("int8", "cuda:0")
    assert asked == [torch.device("cuda:0")]
    with pytest.raises(QuantizationError, match="CPU only"):  # int4 is refused before any GPU is asked
        check_quantization("int4", "cuda:1")
    assert len(asked) == 1


COMPILE_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from xgenmm.model.quant import triton_int8 as t

    # what the JIT specialises on at the model's widths (multiples of 16): aligned pointers, strides, N and K
    aligned = ("x_ptr", "q_ptr", "scale_ptr", "bias_ptr", "out_ptr", "N", "K", "x_stride", "q_stride", "out_stride")
    fn = t._int8_weight_only_kernel
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    for arch, x_dt, out_dt in ((80, "bf16", "bf16"), (90, "fp16", "fp32")):
        sig = {"x_ptr": "*" + x_dt, "q_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": "*" + x_dt,
               "out_ptr": "*" + out_dt, "M": "i32", "N": "i32", "K": "i32", "x_stride": "i64",
               "q_stride": "i64", "out_stride": "i64", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "UPCAST_DOT": "constexpr",
               "EMULATE_BF16": "constexpr"}
        consts = {"HAS_BIAS": True, "BLOCK_M": t.LAUNCH.block_m, "BLOCK_N": t.LAUNCH.block_n,
                  "BLOCK_K": t.LAUNCH.block_k, "UPCAST_DOT": False, "EMULATE_BF16": False}
        k = triton.compile(ASTSource(fn=t._int8_weight_only_kernel, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": t.LAUNCH.num_warps, "num_stages": t.LAUNCH.num_stages,
                                    "enable_fp_fusion": False})
        ptx = k.asm["ptx"]
        assert "mma" in ptx, (arch, x_dt)  # the int8 tile runs on the tensor cores after conversion
        assert "cp.async" in ptx, (arch, x_dt)  # the weight stream is software-pipelined (num_stages)
        assert "fma.rn" not in ptx, (arch, x_dt)  # scale and bias: two roundings, as on the CPU route
        assert k.asm["cubin"]
        assert k.metadata.shared <= 99 * 1024, k.metadata.shared  # launches on sm_86 / sm_89 (99 KiB per block)
    print("compiled")
    """
)


def test_kernel_compiles_for_sm80_and_sm90_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout
