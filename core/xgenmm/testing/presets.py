"""Sizes and the JSON configs (config.json, generation_config.json, preprocessor_config.json) of random checkpoints.

The files follow the official repos. Random presets, like the golden fixture, spell out their small dimensions:
every `text_config` field explicitly, `vision_encoder_config.siglip_vision_config` for the vision tower and
`vision_tokenizer_config.vis_feature_dim / lang_embedding_dim`. The `full` preset writes only what the official
config holds, so its dimensions come from `transformers.Phi3Config` defaults and the so400m tower, as for the real
checkpoints. The perceiver's depth 6 / heads 16 / dim_head 96 / ff_mult 4 are constructor defaults of the official
class (not in the config) and are the same in every preset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

ANYRES_GRIDS: list[list[int]] = [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
VARIANTS = ("interleave", "instruct", "singleimg", "dpo", "base")
INSTRUCT_VARIANTS = ("interleave", "instruct", "singleimg", "dpo")

PERCEIVER_DEPTH = 6
PERCEIVER_HEADS = 16
PERCEIVER_DIM_HEAD = 96
PERCEIVER_FF_MULT = 4
NUM_VIS_TOKENS = 128
INITIAL_TOKENIZER_LEN = 32012
NUM_ADDITIONAL_TOKENS = 3


@dataclass(frozen=True)
class TextDims:
    """Phi-3 decoder dimensions (resolved)."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionDims:
    """SigLIP vision tower dimensions (resolved; defaults = google/siglip-so400m-patch14-384)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class Preset:
    """A random-checkpoint size. `explicit_dims` = write the dims into config.json (all presets but `full`)."""

    name: str
    text: TextDims
    vision: VisionDims
    explicit_dims: bool

    @property
    def perceiver_dim(self) -> int:
        return self.vision.hidden_size

    @property
    def lang_dim(self) -> int:
        return self.text.hidden_size


PRESETS: dict[str, Preset] = {
    # Same dims as tests/fixtures/xgenmm-tiny (used by the test suite).
    "tiny": Preset(
        "tiny",
        TextDims(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
        VisionDims(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        explicit_dims=True,
    ),
    # CPU benchmarks: real geometry (head_dim 96, 729 patch tokens, 128 latents, 16x96 perceiver heads), narrow widths.
    "small": Preset(
        "small",
        TextDims(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
        VisionDims(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
        explicit_dims=True,
    ),
    # Benchmarks' representative workload: the real widths (every GEMM shape, head size, KV bytes per token and
    # vision token count of the real model) at about a quarter of its cost in each part: 8 of the 32 decoder layers
    # and 5 of the 27 SigLIP layers beside the perceiver, whose depth (6) is fixed. Per 5-crop image request of ~700
    # prompt tokens that keeps vision : prefill FLOPs at 0.73 (real: 0.72) and decode weight bytes per token at 0.27x,
    # which `small` (a full-width perceiver beside a 384-wide LM) does not. 1.29 B parameters, 2.6 GB in bf16.
    "scaled": Preset("scaled", TextDims(num_hidden_layers=8), VisionDims(num_hidden_layers=5), explicit_dims=True),
    # The real xGen-MM v1.5 (Phi-3-mini + SigLIP so400m): 4,359,257,219 parameters.
    "full": Preset("full", TextDims(), VisionDims(), explicit_dims=False),
}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ConfigError(f"unknown random-checkpoint preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown checkpoint variant {variant!r}; choose one of {list(VARIANTS)}")
    return variant


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise ConfigError(f"unsupported checkpoint dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unsupported checkpoint dtype {dtype!r}; use float32, bfloat16 or float16")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype | str) -> str:
    return _DTYPE_NAMES[resolve_dtype(dtype)]


def _text_config(p: Preset, dtype: str) -> dict:
    text = {"model_type": "phi3", "initial_tokenizer_len": INITIAL_TOKENIZER_LEN, "sliding_window": 2047, "torch_dtype": dtype}
    if not p.explicit_dims:
        return text
    t = p.text
    text.update(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling=None,
        rms_norm_eps=1e-05,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )
    return text


def _siglip_vision_config(v: VisionDims) -> dict:
    return {
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-06,
        "attention_dropout": 0.0,
        "model_type": "siglip_vision_model",
    }


def build_config(preset: str | Preset = "tiny", variant: str = "interleave", dtype: torch.dtype | str = torch.float32) -> dict:
    """The config.json dict of a random checkpoint (official XGenMMConfig format)."""
    p = get_preset(preset)
    check_variant(variant)
    name = dtype_name(dtype)
    base = variant == "base"

    venc: dict = {}
    if p.explicit_dims:
        venc["model_name"] = "google/siglip-so400m-patch14-384"  # the only name the official class accepts
    venc["anyres_patch_sampling"] = True
    venc["image_aspect_ratio"] = "anyres"
    if not base:
        venc["anyres_grids"] = [list(g) for g in ANYRES_GRIDS]
    venc["model_type"] = "xgenmm_vision_encoder"
    if p.explicit_dims:
        venc["siglip_vision_config"] = _siglip_vision_config(p.vision)

    vtok: dict = {"model_type": "xgenmm_vision_tokenizer"}
    if p.explicit_dims:
        vtok.update(
            vis_feature_dim=p.perceiver_dim,
            lang_embedding_dim=p.lang_dim,
            num_vis_tokens=NUM_VIS_TOKENS,
            image_aspect_ratio="none" if base else "anyres",
        )

    return {
        "architectures": ["XGenMMModelForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "modeling_xgenmm.XGenMMConfig",
            "AutoModelForVision2Seq": "modeling_xgenmm.XGenMMModelForConditionalGeneration",
        },
        "model_type": "xgenmm",
        "text_config": _text_config(p, name),
        "torch_dtype": name,
        "transformers_version": "4.41.1" if base else "4.44.2",
        "vision_encoder_config": venc,
        "vision_tokenizer_config": vtok,
    }


def build_generation_config(variant: str = "interleave") -> dict:
    """generation_config.json as in the official repos (the chat demos override eos/pad with 32007/32011)."""
    check_variant(variant)
    return {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "pad_token_id": 32000,
        "transformers_version": "4.41.1" if variant == "base" else "4.44.2",
    }


def build_preprocessor_config(variant: str = "interleave") -> dict:
    """preprocessor_config.json: anyres grids for the instruct variants, `grids: null` (no anyres) for base."""
    check_variant(variant)
    config: dict = {
        "auto_map": {"AutoImageProcessor": "image_processing_blip_3.Blip3ImageProcessor"},
        "do_resize": True,
        "grids": None if variant == "base" else [list(g) for g in ANYRES_GRIDS],
    }
    if variant != "base":
        config["image_aspect_ratio"] = "anyres"
    config.update(
        {
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Blip3ImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "interpolation_mode": "bicubic",
            "resize_mode": "squash",
            "size": [384, 384],
        }
    )
    return config
