"""`make_random_checkpoint`: a complete random xGen-MM v1.5 checkpoint directory in the official format.

Used by the tests (`tiny`, same dims as the golden fixture), CPU benchmarks (`small`) and GPU load / speed checks
(`full`, the real 4.4 B-parameter geometry, generated tensor by tensor into shards with bounded memory).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from ..errors import ConfigError
from .presets import (
    build_config,
    build_generation_config,
    build_preprocessor_config,
    check_variant,
    get_preset,
    resolve_dtype,
)
from .safetensors_stream import tensor_nbytes, write_safetensors_streaming
from .tensor_specs import TensorSpec, checkpoint_tensor_specs
from .tokenizer import copy_tokenizer_files, save_random_tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def shard_file_name(index: int, num_shards: int) -> str:
    return f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"


def split_into_shards(specs: list[TensorSpec], num_shards: int, dtype: torch.dtype) -> list[list[TensorSpec]]:
    """Contiguous groups of roughly equal byte size, none empty."""
    if not 1 <= num_shards <= len(specs):
        raise ConfigError(f"num_shards must be between 1 and {len(specs)}, got {num_shards}")
    sizes = [tensor_nbytes(s.shape, dtype) for s in specs]
    total = sum(sizes)
    shards: list[list[TensorSpec]] = [[] for _ in range(num_shards)]
    done = 0
    shard = 0
    for i, (spec, size) in enumerate(zip(specs, sizes)):
        remaining_tensors = len(specs) - i
        remaining_shards = num_shards - shard - 1
        # move on when this shard has reached its share, or when the rest must each get at least one tensor
        if shards[shard] and shard < num_shards - 1 and (
            done + size / 2 > total * (shard + 1) / num_shards or remaining_tensors <= remaining_shards
        ):
            shard += 1
        shards[shard].append(spec)
        done += size
    return shards


def _tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed: a tensor's values depend only on (seed, name), not on the preset's other tensors."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def _random_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(_tensor_seed(seed, spec.name))
    mean, std = spec.mean_std
    t = torch.randn(spec.shape, generator=generator, device=device, dtype=torch.float32)
    t.mul_(std)
    if mean:
        t.add_(mean)
    return t.to(dtype)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _remove_stale_weights(path: Path) -> None:
    for old in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        if old.is_file():
            old.unlink()


def make_random_checkpoint(
    path: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    variant: str = "interleave",
    dtype: torch.dtype | str = torch.float32,
    num_shards: int = 2,
    *,
    device: str | torch.device = "cpu",
    config_only: bool = False,
    progress: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write a random checkpoint directory at `path` and return it.

    Files: config.json, generation_config.json, preprocessor_config.json, the tokenizer files and the weights as
    `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` (or one `model.safetensors` when
    `num_shards=1`). `config_only=True` writes everything but the weights. `device="cuda"` draws the random
    numbers on the GPU (much faster for `full`); values then differ from the CPU ones for the same seed.
    Deterministic for a given (preset, seed, variant, dtype, device). The tokenizer is the synthetic Phi-3-layout
    one, or the files of `tokenizer_dir` (e.g. the sentencepiece-trained one in tests/fixtures/tokenizer/phi3-spm).
    """
    p = get_preset(preset)
    check_variant(variant)
    torch_dtype = resolve_dtype(dtype)
    device = torch.device(device)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    _write_json(out / "config.json", build_config(p, variant, torch_dtype))
    _write_json(out / "generation_config.json", build_generation_config(variant))
    _write_json(out / "preprocessor_config.json", build_preprocessor_config(variant))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    else:
        save_random_tokenizer(out)
    _remove_stale_weights(out)
    if config_only:
        return out

    specs = checkpoint_tensor_specs(p)
    by_name = {s.name: s for s in specs}
    shards = split_into_shards(specs, num_shards, torch_dtype)
    names = [SINGLE_FILE] if num_shards == 1 else [shard_file_name(i, num_shards) for i in range(num_shards)]

    def produce(name: str) -> torch.Tensor:
        return _random_tensor(by_name[name], seed, torch_dtype, device)

    total = 0
    weight_map: dict[str, str] = {}
    for file_name, group in zip(names, shards):
        if progress:
            n_params = sum(s.numel for s in group)
            print(f"writing {out / file_name}: {len(group)} tensors, {n_params:,} parameters", flush=True)
        total += write_safetensors_streaming(
            out / file_name, [(s.name, s.shape) for s in group], torch_dtype, produce, metadata={"format": "pt"}
        )
        weight_map.update({s.name: file_name for s in group})
    if num_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out / INDEX_FILE, index)
    return out
