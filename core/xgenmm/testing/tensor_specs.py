"""Every tensor of an official xGen-MM v1.5 checkpoint: key, shape and how a random checkpoint initialises it.

Names and shapes follow the official state dict (`vlm.vision_encoder.*` = SigLIP vision transformer incl. the unused
attention-pooling `head.*`, `vlm.vision_tokenizer.*` = perceiver resampler, `vlm.lang_model.*` = Phi-3 with the
decoupled embedding / biased decoupled head). The init scheme is the golden fixture's (see its MANIFEST.md), chosen
so that nothing is trivial: norms are not all ones, biases are not zero, the head bias matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .presets import (
    NUM_ADDITIONAL_TOKENS,
    NUM_VIS_TOKENS,
    PERCEIVER_DIM_HEAD,
    PERCEIVER_FF_MULT,
    PERCEIVER_HEADS,
    Preset,
    get_preset,
)

# init kinds -> (mean, std); "matrix" uses std = 1/sqrt(fan_in)
INIT_KINDS: dict[str, tuple[float, float]] = {
    "norm_weight": (1.0, 0.1),
    "bias": (0.0, 0.05),
    "head_bias": (0.0, 0.3),
    "embedding": (0.0, 0.5),
    "latent": (0.0, 1.0),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # a key of INIT_KINDS, or "matrix"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def mean_std(self) -> tuple[float, float]:
        if self.init == "matrix":
            return 0.0, 1.0 / math.sqrt(self.fan_in)
        return INIT_KINDS[self.init]


def _linear(out: list[TensorSpec], prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
    out.append(TensorSpec(f"{prefix}.weight", (out_dim, in_dim), "matrix"))
    if bias:
        out.append(TensorSpec(f"{prefix}.bias", (out_dim,), "bias"))


def _layer_norm(out: list[TensorSpec], prefix: str, dim: int, bias: bool = True) -> None:
    out.append(TensorSpec(f"{prefix}.weight", (dim,), "norm_weight"))
    if bias:
        out.append(TensorSpec(f"{prefix}.bias", (dim,), "bias"))


def vision_encoder_specs(p: Preset) -> list[TensorSpec]:
    v = p.vision
    h, i = v.hidden_size, v.intermediate_size
    pre = "vlm.vision_encoder"
    out = [
        TensorSpec(f"{pre}.embeddings.patch_embedding.weight", (h, v.num_channels, v.patch_size, v.patch_size), "matrix"),
        TensorSpec(f"{pre}.embeddings.patch_embedding.bias", (h,), "bias"),
        TensorSpec(f"{pre}.embeddings.position_embedding.weight", (v.num_positions, h), "embedding"),
    ]
    for layer in range(v.num_hidden_layers):
        lp = f"{pre}.encoder.layers.{layer}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            _linear(out, f"{lp}.self_attn.{proj}", h, h)
        _layer_norm(out, f"{lp}.layer_norm1", h)
        _linear(out, f"{lp}.mlp.fc1", i, h)
        _linear(out, f"{lp}.mlp.fc2", h, i)
        _layer_norm(out, f"{lp}.layer_norm2", h)
    _layer_norm(out, f"{pre}.post_layernorm", h)
    # attention-pooling head: present in the checkpoint, unused at inference
    out.append(TensorSpec(f"{pre}.head.probe", (1, 1, h), "latent"))
    out.append(TensorSpec(f"{pre}.head.attention.in_proj_weight", (3 * h, h), "matrix"))
    out.append(TensorSpec(f"{pre}.head.attention.in_proj_bias", (3 * h,), "bias"))
    _linear(out, f"{pre}.head.attention.out_proj", h, h)
    _layer_norm(out, f"{pre}.head.layernorm", h)
    _linear(out, f"{pre}.head.mlp.fc1", i, h)
    _linear(out, f"{pre}.head.mlp.fc2", h, i)
    return out


def vision_tokenizer_specs(p: Preset) -> list[TensorSpec]:
    d, lang = p.perceiver_dim, p.lang_dim
    inner = PERCEIVER_HEADS * PERCEIVER_DIM_HEAD
    ff = PERCEIVER_FF_MULT * d
    pre = "vlm.vision_tokenizer"
    out = [TensorSpec(f"{pre}.latents", (NUM_VIS_TOKENS, d), "latent")]
    for layer in range(6):
        lp = f"{pre}.layers.{layer}"
        _layer_norm(out, f"{lp}.0.norm_media", d)
        _layer_norm(out, f"{lp}.0.norm_latents", d)
        _linear(out, f"{lp}.0.to_q", inner, d, bias=False)
        _linear(out, f"{lp}.0.to_kv", 2 * inner, d, bias=False)
        _linear(out, f"{lp}.0.to_out", d, inner, bias=False)
        _layer_norm(out, f"{lp}.1.0", d)
        _linear(out, f"{lp}.1.1", ff, d, bias=False)
        _linear(out, f"{lp}.1.3", d, ff, bias=False)
    _layer_norm(out, f"{pre}.norm", d)
    _linear(out, f"{pre}.projection", lang, d)
    return out


def lang_model_specs(p: Preset) -> list[TensorSpec]:
    t = p.text
    h, i, hd = t.hidden_size, t.intermediate_size, t.head_dim
    pre = "vlm.lang_model"
    out = [
        TensorSpec(f"{pre}.model.embed_tokens.weight", (t.vocab_size, h), "embedding"),
        TensorSpec(f"{pre}.model.embed_tokens.additional_embedding.weight", (NUM_ADDITIONAL_TOKENS, h), "embedding"),
    ]
    qkv_rows = (t.num_attention_heads + 2 * t.num_key_value_heads) * hd
    for layer in range(t.num_hidden_layers):
        lp = f"{pre}.model.layers.{layer}"
        _linear(out, f"{lp}.self_attn.o_proj", h, t.num_attention_heads * hd, bias=False)
        _linear(out, f"{lp}.self_attn.qkv_proj", qkv_rows, h, bias=False)
        _linear(out, f"{lp}.mlp.gate_up_proj", 2 * i, h, bias=False)
        _linear(out, f"{lp}.mlp.down_proj", h, i, bias=False)
        _layer_norm(out, f"{lp}.input_layernorm", h, bias=False)
        _layer_norm(out, f"{lp}.post_attention_layernorm", h, bias=False)
    _layer_norm(out, f"{pre}.model.norm", h, bias=False)
    out.append(TensorSpec(f"{pre}.lm_head.weight", (t.vocab_size, h), "matrix"))
    out.append(TensorSpec(f"{pre}.lm_head.bias", (t.vocab_size,), "head_bias"))
    out.append(TensorSpec(f"{pre}.lm_head.additional_fc.weight", (NUM_ADDITIONAL_TOKENS, h), "matrix"))
    out.append(TensorSpec(f"{pre}.lm_head.additional_fc.bias", (NUM_ADDITIONAL_TOKENS,), "head_bias"))
    return out


def checkpoint_tensor_specs(preset: str | Preset = "tiny") -> list[TensorSpec]:
    """All tensors of a checkpoint of this preset, in module order (vision encoder, perceiver, language model)."""
    p = get_preset(preset)
    return vision_encoder_specs(p) + vision_tokenizer_specs(p) + lang_model_specs(p)
