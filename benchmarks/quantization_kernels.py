"""The quantized linears against the full-precision ones at decode shapes (M = 1..16 rows), full-size Phi-3 widths:
qkv 3072->9216, o 3072->3072, gate_up 3072->16384, down 8192->3072, LM head 3072->32064.

Per shape and M: median of interleaved rounds (each round times every kernel once, best of a short burst), so a slow
phase of this shared machine hits every kernel alike. Kernels: oneDNN float32 (this CPU's default linear), ATen bf16
`F.linear`, int8 weight-only (`Int8WeightOnlyLinear`: bf16 activations), ATen's int8 kernel fed float32 activations
(why we feed bf16), int4 (`Int4WeightOnlyLinear`), fp8 (`Fp8Linear`, `torch._scaled_mm` on CPU, on the o shape
only: a test path on CPU). Also checks that each
quantized kernel's rows do not depend on M (bit for bit).

    .venv/bin/python benchmarks/quantization_kernels.py [--rows 1,4,8,16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {"qkv": (3072, 9216), "o": (3072, 3072), "gate_up": (3072, 16384), "down": (8192, 3072),
          "lm_head": (3072, 32064)}


def best_ms(fn, burst: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(burst):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv: list[str] | None = None) -> dict:
    from quantization_cpu import bandwidth_gb_s, cpu_features, cpu_name

    from xgenmm.model.quant import Fp8Linear, Int4WeightOnlyLinear, Int8WeightOnlyLinear

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantization_kernels.json"))
    args = ap.parse_args(argv)
    rows = [int(m) for m in args.rows.split(",")]
    report = {"cpu": cpu_name(), "cpu_features": cpu_features(), "torch": torch.__version__,
              "bandwidth_gb_s_before": round(bandwidth_gb_s(), 2), "rounds": args.rounds, "shapes": {}}
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        k, n = SHAPES[shape]
        w = torch.randn(n, k, generator=g) / k**0.5
        wb = w.bfloat16()
        int8, int4, fp8 = (cls.from_weight(w, None) for cls in (Int8WeightOnlyLinear, Int4WeightOnlyLinear, Fp8Linear))
        ones = torch.ones(n)
        results = {}
        for m in rows:
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            kernels = {
                "float32_onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                "bf16_aten": lambda: F.linear(xb, wb),
                "int8": lambda: int8(xb),
                "int8_aten_float32_activations": lambda: torch.ops.aten._weight_int8pack_mm(x, int8.weight_int8, ones),
                "int4": lambda: int4(xb),
                "fp8": lambda: fp8(xb),
            }
            if m > 1:  # the slow float32-activation path: only where it decides something
                kernels.pop("int8_aten_float32_activations")
            if shape != "o":  # fp8 on CPU is a test path (hundreds of ms per layer): timed on one shape only
                kernels.pop("fp8")
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for _ in range(args.rounds):
                for name, fn in kernels.items():
                    times[name].append(best_ms(fn))
            med = {name: statistics.median(v) for name, v in times.items()}
            results[m] = {name: {"median_ms": round(med[name], 3), "min_ms": round(min(times[name]), 3),
                                 "max_ms": round(max(times[name]), 3),
                                 "weight_gb_s": round(_weight_bytes(name, n, k) / (med[name] / 1e3) / 1e9, 2)}
                          for name in kernels}
            print(f"{shape} {k}->{n} M={m}: " + ", ".join(f"{name} {med[name]:.2f} ms" for name in kernels), flush=True)
        xs = torch.randn(max(rows), k, generator=g).bfloat16()
        invariant = {name: all(torch.equal(layer(xs[:m]), layer(xs)[:m]) for m in rows)
                     for name, layer in (("int8", int8), ("int4", int4), ("fp8", fp8))}
        report["shapes"][shape] = {"k": k, "n": n, "rows": results, "rows_independent_of_batch": invariant}
    report["bandwidth_gb_s_after"] = round(bandwidth_gb_s(), 2)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


def _weight_bytes(name: str, n: int, k: int) -> float:
    per = {"float32_onednn": 4, "bf16_aten": 2, "int8": 1, "int8_aten_float32_activations": 1, "int4": 0.5, "fp8": 1}
    return n * k * per[name]


if __name__ == "__main__":
    main()
