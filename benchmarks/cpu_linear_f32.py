"""The float32 language model's linear layers on this CPU: our packed AVX2 kernel vs oneDNN, side by side in one run.

What `PackedF32Linear` (`model/cpu_linear.py`, csrc/linear_f32_avx2.cpp) replaced on AVX2 CPUs, where `dtype="auto"`
is float32: the Phi-3-mini shapes (qkv, o, gate_up, down) at decode row counts (1-16: a few streams decoding
together) and prefill ones (64, 700: a chunk, an image prompt). Kernels:

* `ours`: our kernel on the weight packed once (`torch.ops.xgenmm_avx2.linear_f32`);
* `onednn`: `torch.ops.mkldnn._linear_pointwise` on the plain weight (what the engine ran before);
* `onednn_prepacked`: the same op on a weight reordered once for the row count (`mkldnn._reorder_linear_weight`),
  oneDNN's pre-packed path, as vLLM's CPU backend uses it (`onednn_mm` on a handler created at load);
* `aten`: `F.linear` (MKL sgemm).

`--rounds` interleaved rounds (the kernel order rotated each round), each cell the median of its repeats; reported
per cell as median / min / max over the rounds, the weight read rate (GB/s) and GFLOP/s, beside the read bandwidth
probed in each round. Also checked: whether a row's result is bit-identical alone and inside an 8-row batch.

    .venv/bin/python benchmarks/cpu_linear_f32.py --rounds 3     # writes benchmarks/results/cpu_linear_f32.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"qkv_proj": (3072, 9216), "o_proj": (3072, 3072), "gate_up_proj": (3072, 16384), "down_proj": (8192, 3072)}
ROWS = (1, 2, 4, 8, 16, 64, 700)
KERNELS = ("ours", "onednn", "onednn_prepacked", "aten")


def _time_ms(fn, budget_s: float = 0.4, max_repeats: int = 20) -> float:
    fn()
    t = time.perf_counter()
    fn()
    once = time.perf_counter() - t
    repeats = max(3, min(max_repeats, int(budget_s / max(once, 1e-6))))
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def read_bandwidth_gb_s(mib: int = 512) -> float:
    """Best of 5 full reads of a `mib` MiB float32 tensor (a sum: one pass, both threads)."""
    a = torch.ones(mib * 2**18)
    best = min(_time_ms(a.sum, budget_s=0.0, max_repeats=3) for _ in range(5))
    return round(mib * 2**20 / best / 1e6, 1)


def kernels_for(w: torch.Tensor, m: int) -> dict:
    ops = torch.ops.xgenmm_avx2
    n = w.shape[0]
    packed = ops.pack_f32_weight(w)
    prepacked = torch.ops.mkldnn._reorder_linear_weight(w, m)
    return {"ours": lambda x: ops.linear_f32(x, packed, None, n),
            "onednn": lambda x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
            "onednn_prepacked": lambda x: torch.ops.mkldnn._linear_pointwise(x, prepacked, None, "none", [], ""),
            "aten": lambda x: F.linear(x, w)}


def rows_independent(fn, x: torch.Tensor) -> bool:
    """Each row of an 8-row batch bit-identical to that row alone."""
    full = fn(x)
    return all(torch.equal(fn(x[i:i + 1]), full[i:i + 1]) for i in range(x.shape[0]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_linear_f32.json"))
    args = ap.parse_args(argv)
    from xgenmm import cpu_kernels
    from xgenmm.cpu_features import cpu_features

    if not cpu_kernels.int8_available():
        raise SystemExit(f"our AVX2 kernels are unavailable here: {cpu_kernels.int8_unavailable_reason()}")
    rows = [int(r) for r in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(n, k, generator=g) / k**0.5 for name, (k, n) in SHAPES.items()}
    inputs = {(name, m): torch.randn(m, SHAPES[name][0], generator=g) for name in SHAPES for m in rows}
    samples: dict[tuple, list[float]] = {}
    bandwidth = []
    with torch.inference_mode():
        for r in range(args.rounds):
            bandwidth.append(read_bandwidth_gb_s())
            order = KERNELS[r % len(KERNELS):] + KERNELS[:r % len(KERNELS)]
            for name, w in weights.items():
                for m in rows:
                    fns = kernels_for(w, m)
                    for kernel in order:
                        samples.setdefault((name, m, kernel), []).append(_time_ms(lambda: fns[kernel](inputs[name, m])))
            print(f"round {r + 1}/{args.rounds}: read bandwidth {bandwidth[-1]} GB/s", file=sys.stderr, flush=True)
        invariance = {}
        for kernel, fn in kernels_for(weights["qkv_proj"], 8).items():
            invariance[kernel] = rows_independent(fn, inputs.get(("qkv_proj", 8), torch.randn(8, 3072, generator=g)))
    cells = {}
    for (name, m, kernel), ms in samples.items():
        k, n = SHAPES[name]
        med = statistics.median(ms)
        cells.setdefault(name, {}).setdefault(str(m), {})[kernel] = {
            "median_ms": round(med, 3), "min_ms": round(min(ms), 3), "max_ms": round(max(ms), 3),
            "weight_gb_s": round(n * k * 4 / med / 1e6, 1), "gflop_s": round(2 * m * n * k / med / 1e6, 1)}
    for name, by_m in cells.items():
        for cell in by_m.values():
            for peer in ("onednn", "onednn_prepacked", "aten"):
                cell[f"ours_vs_{peer}"] = round(cell[peer]["median_ms"] / cell["ours"]["median_ms"], 2)
    report = {"benchmark": "cpu_linear_f32", "cpu": platform.processor() or platform.machine(),
              "cpu_features": {"capability": torch.backends.cpu.get_cpu_capability(),
                               "avx512_bf16": cpu_features().avx512_bf16, "threads": torch.get_num_threads()},
              "torch": torch.__version__, "rounds": args.rounds, "read_bandwidth_gb_s": bandwidth,
              "rows_independent_of_batch": invariance, "shapes": cells}
    print(f"{'shape':14}{'rows':>6}" + "".join(f"{k:>18}" for k in KERNELS) + f"{'ours vs onednn':>16}{'vs prepacked':>14}")
    for name, by_m in cells.items():
        for m, cell in by_m.items():
            print(f"{name:14}{m:>6}" + "".join(f"{cell[k]['median_ms']:>9.2f} ms {cell[k]['weight_gb_s']:>4.0f}GB/s"
                                               for k in KERNELS)
                  + f"{cell['ours_vs_onednn']:>15.2f}x{cell['ours_vs_onednn_prepacked']:>13.2f}x")
    print(f"rows independent of the batch: {invariance}; read bandwidth per round {bandwidth} GB/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
