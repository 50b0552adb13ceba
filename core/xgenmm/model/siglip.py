"""SigLIP vision tower, built from its config with `transformers` (never downloaded).

We keep only what xGen-MM consumes: the post-layernorm last hidden state, all 729 patch tokens. The attention-pooling
head is not built (`vision_use_head=False`); its checkpoint keys are ignored on purpose by the loader.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def build_siglip_vision_tower(vision_kwargs: dict[str, Any], attn_implementation: str = "sdpa") -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(**vision_kwargs, vision_use_head=False)
    config._attn_implementation = attn_implementation
    model = SiglipVisionModel(config)
    # transformers 4.x nests the transformer under `.vision_model`; 5.x does not. The checkpoint has no such level.
    return getattr(model, "vision_model", model)


def siglip_features(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """[P, 3, 384, 384] -> [P, 729, C] post-layernorm last hidden state."""
    return tower(pixel_values=pixel_values).last_hidden_state


def reset_siglip_buffers(tower: nn.Module) -> None:
    """Recreate non-persistent buffers after building on the meta device."""
    embeddings = getattr(tower, "embeddings", None)
    if embeddings is not None and hasattr(embeddings, "position_ids"):
        n = embeddings.position_ids.shape[-1]
        embeddings.position_ids = torch.arange(n, device=embeddings.position_ids.device).expand((1, -1))
