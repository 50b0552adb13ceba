"""Where a batch-1 decode step's device time goes on a GPU (run after gpu_check.py showed the replayed step, not the
host, holding single-stream decode at about half the bandwidth limit).

Three measurements on the `full` random checkpoint in bf16, one run:
  gemv          every Phi-3 linear shape at M=1 (cuBLAS through F.linear) and the LM head, 8 of them replayed as one
                CUDA graph: microseconds and the weight-read bandwidth each reaches, beside a plain read (sum)
  graph_kernels torch.profiler over replays of the captured batch-1 decode graph: device time per kernel name per
                step, their sum, and the replay's wall time (the difference is the gaps between kernels)
  eager_kernels the same step run eagerly (no graph), for the kernel list with launch gaps included

  bash benchmarks/gpu_check.sh is not needed: PYTHONPATH=core:. python3 benchmarks/gpu_decode_profile.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import device_slug, make_checkpoint, timed  # noqa: E402


def gemv_shapes(device: torch.device) -> list[dict]:
    """F.linear at one row for each Phi-3-mini weight shape: achieved weight-read bandwidth."""
    rows = []
    shapes = {"qkv_proj": (9216, 3072), "o_proj": (3072, 3072), "gate_up_proj": (16384, 3072),
              "down_proj": (3072, 8192), "lm_head": (32015, 3072)}  # fmt: skip
    for name, (n, k) in shapes.items():
        # 8 copies so consecutive calls read cold weights (the 60 MB L2 would hold one o_proj)
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(8)]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        for w in weights:  # cuBLAS picks and initialises its kernel outside the capture
            F.linear(x, w)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()  # one replay = 8 back-to-back GEMVs with no launch gaps from Python
        with torch.cuda.graph(graph):
            for w in weights:
                F.linear(x, w)
        seconds = timed(graph.replay, device, repeats=50, warmup=3) / len(weights)
        flat = torch.cat([w.view(-1) for w in weights[:2]])
        read_s = timed(lambda: flat.sum(), device, repeats=50, warmup=3) / 2
        rows.append({"op": name, "n": n, "k": k, "us": round(seconds * 1e6, 2),
                     "gb_s": round(2 * n * k / seconds / 1e9, 1),
                     "sum_same_bytes_us": round(read_s * 1e6, 2)})  # fmt: skip
        del weights, flat
    torch.cuda.empty_cache()
    return rows


def kernel_table(prof, steps: int) -> dict:
    per_name: dict = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_name[evt.name][0] += 1
            per_name[evt.name][1] += evt.device_time  # microseconds
    total = sum(v[1] for v in per_name.values())
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:30]
    return {
        "kernel_us_per_step": round(total / steps, 1),
        "kernels_per_step": round(sum(v[0] for v in per_name.values()) / steps, 1),
        "top": [{"name": name[:160], "calls_per_step": round(c / steps, 2), "us_per_step": round(t / steps, 1)}
                for name, (c, t) in top],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", default="/tmp/xgenmm-random-full-bfloat16")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--gemv-only", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    out: dict = {"device_name": torch.cuda.get_device_name(device), "torch": torch.__version__}
    path = Path(args.out) / f"gpu_decode_profile_{device_slug(device)}_{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save():
        path.write_text(json.dumps(out, indent=1) + "\n")

    out["gemv"] = gemv_shapes(device)
    save()
    print(json.dumps(out["gemv"], indent=1), flush=True)
    if args.gemv_only:
        return
    out["checkpoint"] = make_checkpoint(Path(args.ckpt_dir), "full", torch.bfloat16, device)

    from xgenmm import SamplingParams
    from xgenmm.client import open_engine
    from xgenmm.llm import LLM

    handle = open_engine("native", args.ckpt_dir, device=device, dtype=torch.bfloat16, attention_backend="triton",
                              gpu_memory_utilization=0.5, shared=False)  # fmt: skip
    llm = LLM.from_handle(handle)
    runner = llm.handle.core.runner
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    llm.generate("Write a long story about a lighthouse keeper and the sea. " * 3, params)  # leaves a bucket-1 step
    graph = runner.decode_graphs.graphs[1]
    out["graph_replay_ms"] = round(1e3 * timed(graph.replay, device, repeats=50, warmup=5), 4)
    steps = 20
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    out["graph_kernels"] = kernel_table(prof, steps)
    save()
    print(json.dumps(out["graph_kernels"], indent=1), flush=True)

    # the same step eagerly: the buffers still hold it
    buffers = runner.decode_graphs.buffers
    meta = buffers.meta(1, max_seq_len=runner.decode_graphs.capture_max_seq_len)

    def eager():
        with torch.inference_mode():
            runner._decode_forward(buffers.input_ids[:1], buffers.positions[:1], meta)

    out["eager_step_ms"] = round(1e3 * timed(eager, device, repeats=20, warmup=3), 4)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            eager()
        torch.cuda.synchronize()
    out["eager_kernels"] = kernel_table(prof, 5)
    save()
    print(json.dumps({k: out[k] for k in ("graph_replay_ms", "eager_step_ms")}), flush=True)
    print(json.dumps(out["eager_kernels"], indent=1)[:3000], flush=True)
    handle.shutdown()
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
