"""`xgenmm make-random-checkpoint OUT`: a random-weight checkpoint in the official format, to try xgenmm offline.

Its answers are gibberish; everything else (tokenizer, image tiling, engine, server) behaves as with real weights.
"""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..testing import PRESETS, VARIANTS

    p = subparsers.add_parser("make-random-checkpoint", help="write a random-weight checkpoint (for offline trials)",
                              description=__doc__)
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="size (default: tiny, a few MB)")
    p.add_argument("--variant", choices=VARIANTS, default="interleave")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to draw the random numbers")
    p.add_argument("--dtype", default=None, help="weight dtype (default: bfloat16 for full, else float32)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..testing import make_random_checkpoint

    dtype = args.dtype or ("bfloat16" if args.preset == "full" else "float32")
    start = time.perf_counter()
    out = make_random_checkpoint(args.out, preset=args.preset, seed=args.seed, variant=args.variant, dtype=dtype,
                                 device=args.device, progress=args.preset == "full")
    print(out)
    print(f"wrote a random {args.preset} checkpoint in {time.perf_counter() - start:.1f}s; try:  "
          f"xgenmm chat --model {out} \"Hello\"", flush=True)
    return 0
