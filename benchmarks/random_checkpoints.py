"""Random checkpoints in the official format for the benchmarks, made once per preset and kept (the full preset is
8.8 GB of bf16 shards and takes minutes to write): `$XGENMM_BENCH_CACHE/<preset>-seed0` (default /tmp/xgenmm-bench),
the directory `full_cpu.py` uses too."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cached_random_checkpoint(preset: str, seed: int = 0) -> Path:
    """The random `preset` checkpoint (bf16 shards for `scaled` / `full`, float32 for the small test presets)."""
    from xgenmm.testing import make_random_checkpoint

    cache = Path(os.environ.get("XGENMM_BENCH_CACHE", "/tmp/xgenmm-bench"))
    final = cache / f"{preset}-seed{seed}"
    if (final / "config.json").exists():
        return final
    partial = cache / f".{preset}-seed{seed}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    make_random_checkpoint(partial, preset=preset, seed=seed,
                           dtype="bfloat16" if preset in ("scaled", "full") else "float32",
                           num_shards=4 if preset == "full" else 1)
    try:
        partial.rename(final)  # atomic: a concurrent maker's finished copy wins, this one is dropped
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return final
