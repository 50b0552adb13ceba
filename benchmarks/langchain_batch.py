"""LangChain `abatch` of 16 image questions vs 16 sequential `invoke` calls, through ChatXGenMM on one engine.

The `small` random preset (real geometry: 729 SigLIP tokens per patch, 128 latents per image tile, head_dim 96;
narrow widths) in float32 on CPU. Every request is one image + one question, greedy, exactly N new tokens
(min_tokens = max_tokens, so a random model's early stop cannot skew the comparison), for each N of
`--max-tokens`. Every run uses its own distinct images, so no run profits from another's vision or prefix cache;
one warm-up request (another image) runs first. Batching saves decode time (one forward pass per step for all 16
sequences); the image encoding and prefill are compute-bound on a CPU and cost about the same either way, so the
speedup grows with the answer length. The script measures that floor (the same batch with one new token) and
reports, per answer length, the most any batching could gain over the sequential loop (sequential / floor).

    .venv/bin/python benchmarks/langchain_batch.py          # writes benchmarks/results/langchain_batch.json

Target: abatch >= 3x faster than the sequential loop on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results" / "langchain_batch.json"


def image_message(seed: int, size: tuple[int, int]):
    """A distinct picture per seed (random rectangles), as a LangChain message with a question."""
    import numpy as np
    from langchain_core.messages import HumanMessage
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        draw.rectangle((x0, y0, x0 + int(rng.integers(10, 120)), y0 + int(rng.integers(10, 120))),
                       fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return [HumanMessage(content=[{"type": "image", "base64": data, "mime_type": "image/png"},
                                  {"type": "text", "text": f"Question {seed}: what shapes and colours do you see?"}])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: a random `small` preset checkpoint)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[32, 128, 512],
                        help="answer lengths to measure (each with fresh images)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 384), metavar=("W", "H"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    from langchain_xgenmm import ChatXGenMM

    root = None
    model = args.model
    if model is None:
        from xgenmm.testing import make_random_checkpoint

        root = Path(tempfile.mkdtemp(prefix="xgenmm-bench-"))
        model = str(make_random_checkpoint(root / "small", preset="small", seed=0))
    try:
        import torch

        n = args.requests
        size = tuple(args.image_size)
        base = ChatXGenMM(model=model, device=args.device, dtype=args.dtype, temperature=0.0)
        start = time.perf_counter()
        first = base.invoke(image_message(10_000, size), max_tokens=1)
        warmup_s = time.perf_counter() - start
        prompt_tokens = first.usage_metadata["input_tokens"]
        # The floor batching cannot go below: the same kind of batch with one output token (images + prefill only).
        floor_inputs = [image_message(900_000 + i, size) for i in range(n)]
        start = time.perf_counter()
        asyncio.run(base.bind(max_tokens=1).abatch(floor_inputs))
        floor_s = time.perf_counter() - start
        print(f"abatch of {n} with 1 new token (image encoding + prefill only): {floor_s:.2f} s")
        runs = []
        for k, max_tokens in enumerate(args.max_tokens):
            llm = base.bind(max_tokens=max_tokens, min_tokens=max_tokens)
            sequential_inputs = [image_message(100_000 * (k + 1) + i, size) for i in range(n)]
            batch_inputs = [image_message(100_000 * (k + 1) + 50_000 + i, size) for i in range(n)]
            start = time.perf_counter()
            sequential = [llm.invoke(m) for m in sequential_inputs]
            sequential_s = time.perf_counter() - start
            start = time.perf_counter()
            batched = asyncio.run(llm.abatch(batch_inputs))
            abatch_s = time.perf_counter() - start
            out_tokens = [m.usage_metadata["output_tokens"] for m in sequential + batched]
            assert all(t == max_tokens for t in out_tokens), out_tokens
            ratio = sequential_s / abatch_s
            runs.append({"output_tokens_per_request": max_tokens, "sequential_invoke_s": round(sequential_s, 3),
                         "abatch_s": round(abatch_s, 3), "speedup": round(ratio, 2), "meets_target": ratio >= 3.0,
                         # no batching can beat the sequential loop by more than this (sequential / floor)
                         "speedup_upper_bound": round(sequential_s / floor_s, 2)})
            print(f"{n} image questions x {max_tokens:4d} new tokens: sequential invoke {sequential_s:7.2f} s   "
                  f"abatch {abatch_s:6.2f} s   speedup {ratio:5.2f}x ({'meets' if ratio >= 3 else 'below'} 3x; "
                  f"at most {sequential_s / floor_s:.2f}x possible)")
        result = {
            "benchmark": "langchain abatch vs sequential invoke (image questions)",
            "preset": "small" if args.model is None else args.model,
            "device": args.device,
            "dtype": args.dtype,
            "requests": n,
            "image_size": list(size),
            "prompt_tokens_per_request": prompt_tokens,
            "warmup_s": round(warmup_s, 3),
            "abatch_one_token_floor_s": round(floor_s, 3),
            "target_speedup": 3.0,
            "runs": runs,
            "load_average_at_end": list(os.getloadavg()),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "unix_time": int(time.time()),
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"prompt: {prompt_tokens} tokens per request (one image + question); written to {args.output}")
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
