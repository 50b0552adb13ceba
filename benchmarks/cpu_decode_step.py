"""CPU decode-step timing (and an optional torch.profiler table) of the model runner on a random checkpoint.

Measures what issue 8's fused-op / CUDA-graph work must not slow down on CPU: one `build_batch` + `execute` of a
pure-decode step (no sampling), at a few batch sizes, after a prefill of `--context` tokens per sequence.

    .venv/bin/python benchmarks/cpu_decode_step.py --preset small --batch 1,8 --steps 200
    .venv/bin/python benchmarks/cpu_decode_step.py --preset small --batch 1 --profile   # op table
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _setup(ckpt: Path, batch: int, context: int, device: str, dtype: str, backend: str | None):
    from xgenmm.checkpoint import load_model
    from xgenmm.engine.block_manager import BlockManager
    from xgenmm.engine.model_runner import ModelRunner
    from xgenmm.engine.sequence import Sequence

    model = load_model(ckpt, device=device, dtype=dtype)
    num_blocks = batch * ((context + 600) // 16 + 2)
    runner = ModelRunner(model, torch.device(device), next(model.parameters()).dtype, 16, num_blocks, backend)
    bm = BlockManager(num_blocks, 16, enable_prefix_caching=False)
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(batch):
        ids = torch.randint(0, 32000, (context,), generator=gen).tolist()
        seq = Sequence(f"r{i}", ids, max_tokens=None)
        assert bm.allocate_slots(seq, context)
        seqs.append(seq)
    runner.execute(runner.build_batch([(s, context) for s in seqs], {}))
    for s in seqs:
        s.num_computed_tokens = context
    return runner, bm, seqs


def _decode_step(runner, bm, seqs) -> None:
    for s in seqs:
        s.append_token(1000 + len(s.token_ids) % 1000)
        assert bm.allocate_slots(s, 1)
    runner.execute(runner.build_batch([(s, 1) for s in seqs], {}))
    for s in seqs:
        s.num_computed_tokens += 1


def measure(ckpt: Path, batch: int, context: int, steps: int, device: str, dtype: str, backend: str | None) -> dict:
    runner, bm, seqs = _setup(ckpt, batch, context, device, dtype, backend)
    for _ in range(10):
        _decode_step(runner, bm, seqs)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _decode_step(runner, bm, seqs)
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "context": context, "steps": steps, "median_ms": round(1e3 * statistics.median(times), 3),
            "p10_ms": round(1e3 * sorted(times)[len(times) // 10], 3), "mean_ms": round(1e3 * statistics.mean(times), 3)}


def profile(ckpt: Path, batch: int, context: int, device: str, dtype: str, backend: str | None, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    runner, bm, seqs = _setup(ckpt, batch, context, device, dtype, backend)
    for _ in range(10):
        _decode_step(runner, bm, seqs)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            _decode_step(runner, bm, seqs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--ckpt", default=None, help="existing checkpoint dir (default: a fresh random one)")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--rows", type=int, default=30)
    args = p.parse_args(argv)
    from xgenmm.testing import make_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else make_random_checkpoint(Path(tmp) / "ckpt", preset=args.preset)
        batches = [int(b) for b in args.batch.split(",")]
        if args.profile:
            print(profile(ckpt, batches[0], args.context, args.device, args.dtype, args.backend, args.rows))
            return []
        results = [measure(ckpt, b, args.context, args.steps, args.device, args.dtype, args.backend) for b in batches]
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
