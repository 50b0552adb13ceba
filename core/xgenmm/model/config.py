"""Model configuration read from the official xGen-MM `config.json`.

The official files hold almost nothing: every Phi-3 setting not in `text_config` is a `transformers.Phi3Config`
default, the SigLIP tower is so400m-patch14-384 unless a (random) checkpoint adds `siglip_vision_config`, and the
perceiver depth / heads are constructor defaults of the upstream class. This module turns that into explicit,
typed settings so the rest of the code never has to know where a value came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_ANYRES_GRIDS: tuple[tuple[int, int], ...] = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))

# google/siglip-so400m-patch14-384 vision tower (the only encoder the official config class accepts).
SO400M_VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_channels=3,
    image_size=384,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    attention_dropout=0.0,
)


__all__ = ["XGenMMConfig", "TextConfig", "PerceiverConfig", "SIZE_BOUNDS"]

# Sane ranges for every size a config.json sets, checked before anything is allocated (a config claiming 1e9 layers
# or a 1e12-token context is refused at once, not after minutes of allocation). Generous: ~100x the real model.
SIZE_BOUNDS: dict[str, tuple[int, int]] = {
    "vocab_size": (32015, 1_000_000),
    "hidden_size": (1, 65_536),
    "intermediate_size": (1, 262_144),
    "num_hidden_layers": (1, 1_024),
    "num_attention_heads": (1, 1_024),
    "num_key_value_heads": (1, 1_024),
    "max_position_embeddings": (1, 1_048_576),
    "initial_tokenizer_len": (32012, 32012),
    "vision.hidden_size": (1, 16_384),
    "vision.intermediate_size": (1, 65_536),
    "vision.num_hidden_layers": (1, 256),
    "vision.num_attention_heads": (1, 256),
    "vision.image_size": (384, 384),
    "vision.patch_size": (14, 14),
    "perceiver.num_latents": (1, 4_096),
}


def _check_size(name: str, value: Any) -> None:
    low, high = SIZE_BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"config.json {name}={value!r} is outside the supported range [{low}, {high}]")


@dataclass(frozen=True)
class TextConfig:
    """Phi-3 decoder settings (after applying `Phi3Config` defaults)."""

    vocab_size: int  # rows of the base embedding matrix (32064)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_act: str
    max_position_embeddings: int
    rope_theta: float
    partial_rotary_factor: float
    rms_norm_eps: float
    sliding_window: int | None
    initial_tokenizer_len: int  # 32012: ids below it use the base rows, the rest the additional ones
    num_additional_tokens: int = 3  # <image>, <image placeholder>, <|endofchunk|>
    bos_token_id: int = 1
    eos_token_id: int = 32000
    pad_token_id: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def effective_vocab_size(self) -> int:
        """Logits the decoupled head produces: 32012 base + 3 additional = 32015."""
        return self.initial_tokenizer_len + self.num_additional_tokens


@dataclass(frozen=True)
class PerceiverConfig:
    dim: int = 1152  # vis_feature_dim
    output_dim: int = 3072  # lang_embedding_dim
    num_latents: int = 128  # num_vis_tokens
    depth: int = 6
    heads: int = 16
    dim_head: int = 96
    ff_mult: int = 4


@dataclass(frozen=True)
class XGenMMConfig:
    text: TextConfig
    vision: dict[str, Any]  # kwargs for transformers.SiglipVisionConfig
    perceiver: PerceiverConfig
    image_aspect_ratio: str = "anyres"
    anyres_patch_sampling: bool = True
    anyres_grids: tuple[tuple[int, int], ...] = DEFAULT_ANYRES_GRIDS
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def vision_hidden_size(self) -> int:
        return int(self.vision["hidden_size"])

    @property
    def vision_image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def tokens_per_patch(self) -> int:
        return self.perceiver.num_latents

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> XGenMMConfig:
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {checkpoint_dir}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> XGenMMConfig:
        if raw.get("model_type") != "xgenmm":
            raise ConfigError(f"config.json model_type is {raw.get('model_type')!r}, expected 'xgenmm'")
        text = _text_config(raw.get("text_config") or {})
        venc = raw.get("vision_encoder_config") or {}
        model_name = venc.get("model_name", "google/siglip-so400m-patch14-384")
        if model_name != "google/siglip-so400m-patch14-384":
            raise ConfigError(f"unsupported vision encoder {model_name!r}: xGen-MM uses google/siglip-so400m-patch14-384")
        vision = dict(SO400M_VISION)
        extra = dict(venc.get("siglip_vision_config") or {})
        extra.pop("model_type", None)
        vision.update(extra)
        vtok = raw.get("vision_tokenizer_config") or {}
        perceiver = PerceiverConfig(
            dim=int(vtok.get("vis_feature_dim", 1152)),
            output_dim=int(vtok.get("lang_embedding_dim", 3072)),
            num_latents=int(vtok.get("num_vis_tokens", 128)),
        )
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size"):
            _check_size(f"vision.{key}", vision.get(key))
        _check_size("perceiver.num_latents", perceiver.num_latents)
        if perceiver.dim != vision["hidden_size"]:
            raise ConfigError(
                f"vision_tokenizer_config.vis_feature_dim={perceiver.dim} does not match the vision width {vision['hidden_size']}"
            )
        if perceiver.output_dim != text.hidden_size:
            raise ConfigError(
                f"vision_tokenizer_config.lang_embedding_dim={perceiver.output_dim} does not match text hidden_size {text.hidden_size}"
            )
        grids = venc.get("anyres_grids") or DEFAULT_ANYRES_GRIDS
        return cls(
            text=text,
            vision=vision,
            perceiver=perceiver,
            image_aspect_ratio=str(venc.get("image_aspect_ratio", "anyres")),
            anyres_patch_sampling=bool(venc.get("anyres_patch_sampling", True)),
            anyres_grids=tuple((int(w), int(h)) for w, h in grids),
            torch_dtype=raw.get("torch_dtype"),
            raw=raw,
        )


def _text_config(d: dict[str, Any]) -> TextConfig:
    """Fill the sparse official text_config with transformers' Phi3Config defaults."""
    from transformers import Phi3Config

    if d.get("model_type", "phi3") != "phi3":
        raise ConfigError(f"text_config.model_type is {d.get('model_type')!r}, expected 'phi3'")
    if "initial_tokenizer_len" not in d:
        raise ConfigError("text_config.initial_tokenizer_len is required (32012 in the official checkpoints)")
    kwargs = {k: v for k, v in d.items() if k not in ("initial_tokenizer_len", "model_type", "torch_dtype", "dtype")}
    _check_size("initial_tokenizer_len", d["initial_tokenizer_len"])
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings"):
        if kwargs.get(key) is not None:
            _check_size(key, kwargs[key])
    try:
        phi3 = Phi3Config(**kwargs)
    except Exception as exc:  # transformers validates rope settings etc.
        raise ConfigError(f"invalid text_config: {exc}") from exc
    rope = getattr(phi3, "rope_parameters", None) or {}
    rope_scaling = d.get("rope_scaling")
    rope_type = (rope or {}).get("rope_type", "default")
    if rope_scaling or rope_type not in ("default", None):
        raise ConfigError(f"rope scaling {rope_scaling or rope!r} is not supported (xGen-MM uses plain RoPE)")
    theta = float(rope.get("rope_theta", getattr(phi3, "rope_theta", 10000.0)))
    partial = float(rope.get("partial_rotary_factor", getattr(phi3, "partial_rotary_factor", 1.0)) or 1.0)
    num_kv = phi3.num_key_value_heads or phi3.num_attention_heads
    pad = phi3.pad_token_id
    return TextConfig(
        vocab_size=phi3.vocab_size,
        hidden_size=phi3.hidden_size,
        intermediate_size=phi3.intermediate_size,
        num_hidden_layers=phi3.num_hidden_layers,
        num_attention_heads=phi3.num_attention_heads,
        num_key_value_heads=num_kv,
        hidden_act=phi3.hidden_act,
        max_position_embeddings=phi3.max_position_embeddings,
        rope_theta=theta,
        partial_rotary_factor=partial,
        rms_norm_eps=phi3.rms_norm_eps,
        sliding_window=d.get("sliding_window", getattr(phi3, "sliding_window", None)),
        initial_tokenizer_len=int(d["initial_tokenizer_len"]),
        bos_token_id=phi3.bos_token_id if phi3.bos_token_id is not None else 1,
        eos_token_id=phi3.eos_token_id if phi3.eos_token_id is not None else 32000,
        pad_token_id=pad if pad is not None else 32000,
    )
