"""Test and benchmark helpers: random checkpoints in the official format, with a real Phi-3-layout tokenizer."""

from .checkpoint import make_random_checkpoint, split_into_shards
from .presets import (
    ANYRES_GRIDS,
    PRESETS,
    VARIANTS,
    Preset,
    TextDims,
    VisionDims,
    build_config,
    build_generation_config,
    build_preprocessor_config,
    get_preset,
)
from .tensor_specs import TensorSpec, checkpoint_tensor_specs
from .tokenizer import build_tokenizer_json, copy_tokenizer_files, phi3_tokenizer_json, save_phi3_tokenizer, save_random_tokenizer

__all__ = [
    "ANYRES_GRIDS",
    "PRESETS",
    "VARIANTS",
    "Preset",
    "TensorSpec",
    "TextDims",
    "VisionDims",
    "build_config",
    "build_generation_config",
    "build_preprocessor_config",
    "build_tokenizer_json",
    "checkpoint_tensor_specs",
    "copy_tokenizer_files",
    "get_preset",
    "make_random_checkpoint",
    "phi3_tokenizer_json",
    "save_phi3_tokenizer",
    "save_random_tokenizer",
    "split_into_shards",
]
