"""The int8 weight-only linears against the full-precision ones, full-size Phi-3 widths: qkv 3072->9216, o
3072->3072, gate_up 3072->16384, down 8192->3072, the folded LM head 3072->32015; decode sizes (M = 1, 4, 8, 16 rows)
and a prefill size (M = 700).

Kernels: `int8_ours` (`Int8WeightOnlyLinear` on our AVX2 kernel, csrc/int8_linear_avx2.cpp, bf16 activations),
`int8_aten` (the same layer on ATen's `_weight_int8pack_mm`, as it ran before), `bf16_aten` (`F.linear` in bf16) and
`float32_onednn` (this CPU's default float32 linear); `--extra` adds int4 (`Int4WeightOnlyLinear`) at decode sizes.
Per shape and M: every round times every kernel once (best of a short burst: 3 calls at decode sizes, 1 at prefill
sizes; bf16 only at decode sizes unless --bf16-prefill), rounds interleaved so a slow phase of this shared machine hits every kernel alike; reported: median, min and
max over the rounds, the weight bytes read per second and GFLOP/s at the median. The machine's read bandwidth
(a 1 GiB float32 `sum`) and the load average are recorded before, between shapes and after, so contention shows.

Also records whether each kernel's rows depend on the batch (bit for bit, a row alone vs inside batches of every
measured size): ours and ATen's int8 must not; oneDNN float32 (qkv) is recorded to show why it is no batch-invariant
fallback for prefill, fp8's `torch._scaled_mm` (o, up to 16 rows) because it makes no such promise.

    .venv/bin/python benchmarks/quantization_kernels.py [--rows 1,4,8,16,700] [--rounds 3] [--shapes qkv,o,...]
        [--threads 1 --out ...]   # one thread: a kernel's own rate, less exposed to a busy machine's scheduling
"""

from __future__ import annotations

import argparse
import json
import os
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
          "lm_head": (3072, 32015)}
BYTES_PER_WEIGHT = {"int8_ours": 1, "int8_aten": 1, "bf16_aten": 2, "float32_onednn": 4, "int4": 0.5}
PREFILL_ROWS = 100  # from this many rows on, one call per burst (a call is hundreds of ms)


def best_ms(fn, burst: int) -> float:
    best = float("inf")
    for _ in range(burst):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def probe() -> dict:
    from quantization_cpu import bandwidth_gb_s

    return {"read_gb_s": round(bandwidth_gb_s(gib=0.5, repeats=3), 2), "loadavg_1min": round(os.getloadavg()[0], 2)}


def _rows_independent(fn, x: torch.Tensor, sizes: list[int]) -> bool:
    """Row 0 alone == row 0 inside the first `size` rows, for every size, bit for bit (and the last row of the
    largest batch alone == itself inside it)."""
    alone = fn(x[:1])
    if not all(torch.equal(fn(x[:size])[:1], alone) for size in sizes):
        return False
    return torch.equal(fn(x[-1:]), fn(x)[-1:])


def main(argv: list[str] | None = None) -> dict:
    from quantization_cpu import cpu_features, cpu_name

    from xgenmm import cpu_kernels
    from xgenmm.model.quant import Fp8Linear, Int4WeightOnlyLinear, Int8WeightOnlyLinear

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16,700")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--extra", action="store_true", help="also int4 (decode sizes)")
    ap.add_argument("--bf16-prefill", action="store_true",
                    help="also bf16 F.linear at prefill sizes (on CPUs without native bf16 it is emulated: ~11 s a "
                         "qkv call at 700 rows here, so off by default to keep the run short)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantization_kernels.json"))
    args = ap.parse_args(argv)
    if not cpu_kernels.int8_available():
        raise SystemExit(f"our int8 kernel is unavailable here: {cpu_kernels.int8_unavailable_reason()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(m) for m in args.rows.split(",")]
    started = time.perf_counter()
    report = {"cpu": cpu_name(), "cpu_features": cpu_features(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "probe_before": probe(), "shapes": {}}
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        k, n = SHAPES[shape]
        w = torch.randn(n, k, generator=g) / k**0.5
        wb = w.bfloat16()
        ours = Int8WeightOnlyLinear.from_weight(w, None)
        assert ours.packed, "Int8WeightOnlyLinear did not pack its weight for our kernel"
        aten = Int8WeightOnlyLinear(ours.weight_int8, ours.scales, None)  # not packed: runs ATen's kernel
        int4 = Int4WeightOnlyLinear.from_weight(w, None) if args.extra else None
        results = {}
        x_all = torch.randn(max(rows), k, generator=g)
        for m in rows:
            x, xb = x_all[:m], x_all[:m].bfloat16()
            kernels = {
                "int8_ours": lambda: ours(xb),
                "int8_aten": lambda: aten(xb),
                "bf16_aten": lambda: F.linear(xb, wb),
                "float32_onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
            }
            if int4 is not None and m < PREFILL_ROWS:
                kernels["int4"] = lambda: int4(xb)
            if m >= PREFILL_ROWS and not args.bf16_prefill:
                kernels.pop("bf16_aten")
            burst = 1 if m >= PREFILL_ROWS else 3
            if m < PREFILL_ROWS:
                for fn in kernels.values():  # warm up (first-touch, oneDNN's primitive cache)
                    fn()
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for _ in range(args.rounds):
                for name, fn in kernels.items():
                    times[name].append(best_ms(fn, burst))
            med = {name: statistics.median(v) for name, v in times.items()}
            results[m] = {name: {"median_ms": round(med[name], 3), "min_ms": round(min(times[name]), 3),
                                 "max_ms": round(max(times[name]), 3),
                                 "weight_gb_s": round(BYTES_PER_WEIGHT[name] * n * k / med[name] / 1e6, 2),
                                 "gflop_s": round(2 * m * n * k / med[name] / 1e6, 1)}
                          for name in kernels}
            results[m]["ours_vs_aten_int8"] = round(med["int8_aten"] / med["int8_ours"], 2)
            results[m]["ours_vs_float32_onednn"] = round(med["float32_onednn"] / med["int8_ours"], 2)
            print(f"{shape} {k}->{n} M={m}: " + ", ".join(f"{name} {med[name]:.2f} ms" for name in kernels),
                  flush=True)
        xb_all = x_all.bfloat16()
        decode_rows = [m for m in rows if m < PREFILL_ROWS] or [1]
        invariant = {"int8_ours": _rows_independent(ours, xb_all, rows),
                     "int8_aten": _rows_independent(aten, xb_all[: max(decode_rows)], decode_rows)}
        if shape == "o":  # fp8 (`torch._scaled_mm`, a test path on CPU: hundreds of ms a call) on one shape only
            fp8 = Fp8Linear.from_weight(w, None)
            invariant["fp8"] = _rows_independent(fp8, xb_all[: max(decode_rows)], decode_rows)
        if shape == "qkv":
            invariant["float32_onednn"] = _rows_independent(
                lambda t: torch.ops.mkldnn._linear_pointwise(t, w, None, "none", [], ""), x_all, rows)
        report["shapes"][shape] = {"k": k, "n": n, "rows": results, "rows_independent_of_batch": invariant,
                                   "probe_after": probe()}
        print(f"{shape}: rows independent of the batch: {invariant}", flush=True)
    report["probe_after"] = probe()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
