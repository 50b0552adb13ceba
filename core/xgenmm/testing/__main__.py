"""CLI: `python -m xgenmm.testing --preset full --out /path --dtype bfloat16 --device cuda`."""

from __future__ import annotations

import argparse
import time

from .checkpoint import make_random_checkpoint
from .presets import PRESETS, VARIANTS
from .tensor_specs import checkpoint_tensor_specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xgenmm.testing", description="Write a random xGen-MM v1.5 checkpoint.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 for full, else float32)")
    parser.add_argument("--device", default="cpu", help="where to draw the random numbers (cpu, cuda)")
    parser.add_argument("--variant", choices=VARIANTS, default="interleave")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=None, help="default: 4 for full, else 2")
    parser.add_argument("--config-only", action="store_true", help="write the JSON and tokenizer files, no weights")
    args = parser.parse_args(argv)

    dtype = args.dtype or ("bfloat16" if args.preset == "full" else "float32")
    num_shards = args.num_shards or (4 if args.preset == "full" else 2)
    n_params = sum(s.numel for s in checkpoint_tensor_specs(args.preset))
    print(f"preset {args.preset} ({n_params:,} parameters), variant {args.variant}, {dtype}, {num_shards} shard(s)")
    start = time.perf_counter()
    out = make_random_checkpoint(
        args.out,
        preset=args.preset,
        seed=args.seed,
        variant=args.variant,
        dtype=dtype,
        num_shards=num_shards,
        device=args.device,
        config_only=args.config_only,
        progress=True,
    )
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
