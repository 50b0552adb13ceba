"""The fused small-op kernels compile for an H100 (sm_90) on a machine without a GPU: Triton lowers them to PTX and
the bundled ptxas assembles a cubin. The interpreter tests check the math; this checks the GPU code generation
(constexpr handling, dtype casts, no emulation code on the GPU path). Runs in a subprocess because the
interpreter tests set TRITON_INTERPRET=1 for the whole test process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from xgenmm.model import fused_ops as f

    target = GPUTarget("cuda", 90, 32)

    def comp(fn, sig, consts):
        # the launch options of the wrappers in fused_ops.py (no floating-point contraction)
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        k = triton.compile(src, target=target, options={"num_warps": 8, "enable_fp_fusion": False})
        # rounding points kept: no FMA (fp32, or bf16 after the compiler narrows a round trip) merges a product
        # into the following sum; an H200 run without this option showed `fma.rn.bf16` in RoPE, 1 bf16 step off
        assert "fma.rn" not in k.asm["ptx"], fn
        return k

    for dt in ("bf16", "fp32"):
        p = "*" + dt
        for res in (False, True):
            k = comp(f._rms_norm_kernel,
                     {"x_ptr": p, "res_ptr": p, "res_out_ptr": p, "w_ptr": p, "out_ptr": p, "x_stride": "i64",
                      "res_stride": "i64", "res_out_stride": "i64", "out_stride": "i64", "n_cols": "i32",
                      "eps": "fp32", "HAS_RESIDUAL": "constexpr", "BLOCK": "constexpr", "EMULATE_BF16": "constexpr"},
                     {"HAS_RESIDUAL": res, "BLOCK": 4096, "EMULATE_BF16": False})
            assert k.asm["cubin"]
        k = comp(f._silu_and_mul_kernel, {"x_ptr": p, "out_ptr": p, "x_stride": "i64", "out_stride": "i64",
                 "n_cols": "i32", "BLOCK": "constexpr", "EMULATE_BF16": "constexpr"},
                 {"BLOCK": 1024, "EMULATE_BF16": False})
        assert k.asm["cubin"]
        k = comp(f._rotary_kernel, {"q_ptr": p, "k_ptr": p, "pos_ptr": "*i64", "cos_sin_ptr": "*fp32",
                 "q_stride_t": "i64", "q_stride_h": "i64", "k_stride_t": "i64", "k_stride_h": "i64",
                 "cs_stride_kind": "i64", "cs_stride_pos": "i64", "num_q_heads": "i32", "num_k_heads": "i32",
                 "HALF": "constexpr", "HALF_PAD": "constexpr", "QH_PAD": "constexpr", "KH_PAD": "constexpr",
                 "EMULATE_BF16": "constexpr"},
                 {"HALF": 48, "HALF_PAD": 64, "QH_PAD": 32, "KH_PAD": 32, "EMULATE_BF16": False})
        assert k.asm["cubin"]
    print("compiled")
    """
)


def test_fused_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout
