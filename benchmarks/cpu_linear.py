"""ATen `F.linear` vs oneDNN (`torch.ops.mkldnn._linear_pointwise`) on this CPU, float32, side by side in one run.

The shapes are the model's: decode (M = batch) and prefill / vision (M = tokens) for the `small` random preset and
the real Phi-3-mini / SigLIP-so400m / perceiver dimensions. Why the engine switches its linears: `model/cpu_linear.py`.

    .venv/bin/python benchmarks/cpu_linear.py            # writes benchmarks/results/cpu_linear.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# (what, M, K, N, bias)
SHAPES = [
    ("small LM head, decode batch 1", 1, 384, 32015, True),
    ("small LM head, decode batch 16", 16, 384, 32015, True),
    ("small qkv_proj, decode batch 16", 16, 384, 1152, False),
    ("small down_proj, decode batch 16", 16, 1024, 384, False),
    ("small gate_up_proj, prefill 2048 tokens", 2048, 384, 2048, False),
    ("perceiver to_kv, 3 patches (small)", 2571, 128, 3072, False),
    ("Phi-3-mini LM head, decode batch 1", 1, 3072, 32015, True),
    ("Phi-3-mini qkv_proj, decode batch 1", 1, 3072, 9216, False),
    ("Phi-3-mini gate_up_proj, decode batch 16", 16, 3072, 16384, False),
    ("Phi-3-mini down_proj, decode batch 16", 16, 8192, 3072, False),
    ("Phi-3-mini qkv_proj, prefill 700 tokens", 700, 3072, 9216, False),
    ("SigLIP-so400m fc1, one 5-crop image", 3645, 1152, 4304, True),
]


def _time(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_linear.json"))
    ap.add_argument("--quick", action="store_true", help="the small shapes only, few repeats")
    args = ap.parse_args(argv)
    from xgenmm.model.cpu_linear import onednn_linear, onednn_linear_available

    if not onednn_linear_available("cpu", torch.float32):
        raise SystemExit("this torch build has no oneDNN CPU linear")
    rows = []
    g = torch.Generator().manual_seed(0)
    shapes = [s for s in SHAPES if not args.quick or s[0].startswith("small")]
    print(f"{'shape':44}{'M x K x N':>22}{'ATen ms':>10}{'oneDNN ms':>11}{'speedup':>9}{'max |diff|':>12}")
    with torch.inference_mode():
        for what, m, k, n, bias in shapes:
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
            b = torch.randn(n, generator=g) if bias else None
            repeats = 3 if args.quick else max(5, min(50, int(2e9 / (m * k * n + 1))))
            aten = _time(lambda: F.linear(x, w, b), repeats)
            dnn = _time(lambda: onednn_linear(x, w, b), repeats)
            diff = (F.linear(x, w, b) - onednn_linear(x, w, b)).abs().max().item()
            rows.append(dict(shape=what, m=m, k=k, n=n, aten_ms=aten, onednn_ms=dnn, speedup=aten / dnn, max_abs_diff=diff))
            print(f"{what:44}{f'{m} x {k} x {n}':>22}{aten:10.2f}{dnn:11.2f}{aten / dnn:8.2f}x{diff:12.1e}")
    report = dict(benchmark="cpu_linear", device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                  torch=torch.__version__, threads=torch.get_num_threads(), rows=rows)
    if args.out and not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
