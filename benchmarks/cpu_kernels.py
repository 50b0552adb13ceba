"""Our CPU kernels against the alternatives on this CPU, side by side in one run (interleaved, best and median).

* bf16 linear layers at the real Phi-3-mini shapes, decode (M = batch 1..16) and prefill (M = 700 tokens): our
  packed kernel (`linear_bf16_packed`, the language model's), our plain-layout kernel (`linear_bf16`, the LM head's),
  oneDNN on the plain weight (what `F.linear` runs in bf16), and oneDNN on a pre-packed weight (what vLLM's CPU
  backend runs). Small M beside the read bandwidth measured here, large M beside oneDNN's best.
* paged decode attention at Phi-3 geometry (32 heads x 96, block 16) in bf16 and float32: `cpu_paged` (reads the
  blocks in place) against the reference backend (gathers them into a contiguous buffer, then SDPA), beside the
  read bandwidth; and the prefill of one 700-token prompt (an image's), `cpu_paged` against the reference's
  causal flash SDPA, beside the FLOP rate.

On an AVX-512 BF16 CPU all of it, with the `xgenmm_cpu` kernels; on an AVX2-only CPU the attention part, with the
`xgenmm_avx2` build of the same kernel (the bf16 linears are AVX-512 BF16 code).

    .venv/bin/python benchmarks/cpu_kernels.py   # writes benchmarks/results/cpu_kernels.json (_avx2.json on AVX2)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

LINEAR_SHAPES = [  # (what, K, N)
    ("qkv_proj", 3072, 9216),
    ("gate_up_proj", 3072, 16384),
    ("down_proj", 8192, 3072),
    ("lm_head", 3072, 32015),
]
LINEAR_ROWS = (1, 4, 8, 16, 700)
ATTENTION_CASES = ((1, 700), (16, 700), (1, 4000))  # (sequences, context)


def _race(fns: dict, repeats: int) -> dict:
    """Interleaved timings: {name: (best_s, median_s)}."""
    samples = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: (min(v), sorted(v)[len(v) // 2]) for k, v in samples.items()}


def linears(bandwidth: float) -> list[dict]:
    ops = torch.ops.xgenmm_cpu
    rows = []
    g = torch.Generator().manual_seed(0)
    for what, k, n in LINEAR_SHAPES:
        w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
        packed = ops.pack_bf16_weight(w)
        onednn_packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        for m in LINEAR_ROWS:
            x = torch.randn(m, k, generator=g).bfloat16()
            fns = {"ours_packed": lambda: ops.linear_bf16_packed(x, packed, None, n),
                   "ours_plain": lambda: ops.linear_bf16(x, w, None),
                   "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                   "onednn_prepacked": lambda: torch.ops.mkldnn._linear_pointwise(x, onednn_packed, None, "none", [], "")}
            t = _race(fns, 9 if m < 100 else 3)
            row = {"shape": what, "m": m, "k": k, "n": n}
            for name, (best, median) in t.items():
                row[f"{name}_ms"] = round(best * 1e3, 3)
                row[f"{name}_median_ms"] = round(median * 1e3, 3)
                if m <= 16:
                    row[f"{name}_fraction_of_bandwidth"] = round(2 * k * n / best / bandwidth, 3)
                else:
                    row[f"{name}_gflop_s"] = round(2 * m * k * n / best / 1e9, 1)
            row["ours_packed_vs_onednn_prepacked"] = round(t["onednn_prepacked"][0] / t["ours_packed"][0], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def attention(bandwidth: float, namespace: str) -> list[dict]:
    from xgenmm.attention import AttentionMetadata, TorchReferenceBackend

    heads, dim, bs = 32, 96, 16
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for seqs, ctx in ATTENTION_CASES:
            per_seq = -(-ctx // bs)
            nb = seqs * per_seq + 8
            k_cache = torch.randn(nb, bs, heads, dim).to(dtype)
            v_cache = torch.randn(nb, bs, heads, dim).to(dtype)
            tables = torch.randperm(nb)[: seqs * per_seq].view(seqs, per_seq).int()
            qsl, lens = list(range(seqs + 1)), [ctx] * seqs
            meta = AttentionMetadata(
                query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(lens, dtype=torch.int32),
                context_lens=torch.tensor([ctx - 1] * seqs, dtype=torch.int32), block_tables=tables,
                slot_mapping=torch.full((seqs,), -1), max_query_len=1, max_seq_len=ctx, block_size=bs,
                query_start_loc_cpu=qsl, seq_lens_cpu=lens, context_lens_cpu=[ctx - 1] * seqs)
            q = torch.randn(seqs, heads, dim).to(dtype)
            out = torch.empty_like(q)
            ref = TorchReferenceBackend()
            fns = {"cpu_paged": lambda: getattr(torch.ops, namespace).paged_attention(
                       out, q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, 0.1, 0),
                   "gather_sdpa": lambda: ref._decode(q, k_cache, v_cache, meta, lens, 0.1, 1)}
            t = _race(fns, 9)
            kv_bytes = 2 * seqs * ctx * heads * dim * k_cache.element_size()
            row = {"dtype": str(dtype).removeprefix("torch."), "sequences": seqs, "context": ctx, "kv_mb": kv_bytes / 1e6}
            for name, (best, median) in t.items():
                row[f"{name}_ms"] = round(best * 1e3, 3)
                row[f"{name}_median_ms"] = round(median * 1e3, 3)
                row[f"{name}_fraction_of_bandwidth"] = round(kv_bytes / best / bandwidth, 3)
            row["speedup"] = round(t["gather_sdpa"][0] / t["cpu_paged"][0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def prefill_attention(namespace: str, tokens: int = 700) -> list[dict]:
    """One fresh prompt of `tokens` (nothing cached): the causal attention of a whole layer, 32 heads x 96."""
    from xgenmm.attention import AttentionMetadata, TorchReferenceBackend

    heads, dim, bs = 32, 96, 16
    nb = -(-tokens // bs)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        k_cache = torch.randn(nb, bs, heads, dim).to(dtype)
        v_cache = torch.randn(nb, bs, heads, dim).to(dtype)
        tables = torch.randperm(nb).view(1, nb).int()
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32), seq_lens=torch.tensor([tokens], dtype=torch.int32),
            context_lens=torch.tensor([0], dtype=torch.int32), block_tables=tables,
            slot_mapping=torch.full((tokens,), -1), max_query_len=tokens, max_seq_len=tokens, block_size=bs,
            query_start_loc_cpu=[0, tokens], seq_lens_cpu=[tokens], context_lens_cpu=[0])
        q = torch.randn(tokens, heads, dim).to(dtype)
        empty = torch.zeros(tokens, heads, dim, dtype=dtype)
        out = torch.empty_like(q)
        ref = TorchReferenceBackend()
        fns = {"cpu_paged": lambda: getattr(torch.ops, namespace).paged_attention(
                   out, q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, 0.1, 0),
               "flash_sdpa": lambda: ref.forward(q, empty, empty, (k_cache, v_cache), meta, 0.1)}
        t = _race(fns, 5)
        flops = 4 * heads * dim * tokens * (tokens + 1) / 2  # QK^T and PV over the causal half, 2 flops per MAC
        row = {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "gflop": round(flops / 1e9, 3)}
        for name, (best, median) in t.items():
            row[f"{name}_ms"] = round(best * 1e3, 3)
            row[f"{name}_median_ms"] = round(median * 1e3, 3)
            row[f"{name}_gflop_s"] = round(flops / best / 1e9, 1)
        row["speedup"] = round(t["flash_sdpa"][0] / t["cpu_paged"][0], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="default benchmarks/results/cpu_kernels.json (_avx2.json on AVX2)")
    args = ap.parse_args(argv)
    from xgenmm import cpu_kernels
    from xgenmm.attention.cpu_paged import kernel_namespace

    namespace = kernel_namespace()
    if namespace is None:
        raise SystemExit(f"the CPU kernels are not available here: {cpu_kernels.unavailable_reason()}; "
                         f"{cpu_kernels.int8_unavailable_reason()}")
    out = args.out or str(ROOT / "benchmarks" / "results" /
                          ("cpu_kernels.json" if namespace == "xgenmm_cpu" else "cpu_kernels_avx2.json"))
    load_before = os.getloadavg()
    from full_cpu import measure_bandwidth  # the same probe as the full-size benchmark (2 MiB pages, as the weights)

    bandwidth = measure_bandwidth(1.0)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    report = {"benchmark": "cpu_kernels", "device": f"cpu ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores)", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "loadavg_before": load_before, "read_bandwidth_gb_s": round(bandwidth / 1e9, 2), "kernels": namespace}
    with torch.inference_mode():
        if namespace == "xgenmm_cpu":
            report["linear_bf16"] = linears(bandwidth)
        report["paged_decode_attention"] = attention(bandwidth, namespace)
        report["paged_prefill_attention"] = prefill_attention(namespace)
    report["loadavg_after"] = os.getloadavg()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
