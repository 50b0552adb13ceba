"""Images -> LM-ready vision tokens: SigLIP, the any-resolution re-chunking quirk, the padding mask, the perceiver.

Reproduces upstream `_encode_vision_x_anyres` (LAVIS xgen-mm) exactly, including its quirk: the grid features are
assembled into the true spatial map and then *viewed* back as chunks of 729 raster positions, which is not the
original 384-px tiles when the grid is more than one patch wide. The weights were trained that way.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import XGenMMConfig
from .perceiver import PerceiverResampler
from .siglip import build_siglip_vision_tower, reset_siglip_buffers, siglip_features


def unpad_mask(image_size_wh: tuple[int, int], grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h, grid_w] bool map of the feature cells that hold image content (upstream `unpad_image`, keep shape).

    Computed in feature-cell units from the original size, with upstream's float arithmetic and truncations.
    """
    original_width, original_height = image_size_wh
    mask = torch.ones(grid_h, grid_w, dtype=torch.bool)
    original_aspect = original_width / original_height
    current_aspect = grid_w / grid_h
    if original_aspect > current_aspect:
        scale = grid_w / original_width
        new_height = int(original_height * scale)
        padding = (grid_h - new_height) // 2
        mask[:padding, :] = False
        mask[grid_h - padding :, :] = False
    else:
        scale = grid_h / original_height
        new_width = int(original_width * scale)
        padding = (grid_w - new_width) // 2
        mask[:, :padding] = False
        mask[:, grid_w - padding :] = False
    return mask


def rechunk_grid_features(grid_features: torch.Tensor, image_size_wh: tuple[int, int], npw: int, nph: int, side: int):
    """Grid patch features [nph*npw, side*side, C] -> (re-chunked features [nph*npw, side*side, C], mask [nph*npw, side*side])."""
    c = grid_features.shape[-1]
    n = side * side
    spatial = (
        grid_features.view(nph, npw, side, side, c)
        .permute(4, 0, 2, 1, 3)  # [C, nph, side, npw, side]
        .reshape(c, nph * side, npw * side)
    )
    mask = unpad_mask(image_size_wh, nph * side, npw * side).to(grid_features.device)
    chunks = spatial.reshape(c, nph * npw, n).permute(1, 2, 0)  # raster chunks of `n` cells, not spatial tiles
    return chunks, mask.reshape(nph * npw, n)


class VisionEncoder(nn.Module):
    """SigLIP tower (`vision_encoder`) + perceiver (`vision_tokenizer`), named as in the checkpoint."""

    def __init__(self, config: XGenMMConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.vision_encoder = build_siglip_vision_tower(config.vision, attn_implementation)
        self.vision_tokenizer = PerceiverResampler(config.perceiver)
        self.patches_per_side = config.vision_image_size // int(config.vision["patch_size"])

    def reset_buffers(self) -> None:
        reset_siglip_buffers(self.vision_encoder)

    @torch.inference_mode()
    def forward(self, images) -> list[torch.Tensor]:
        """list[ProcessedImage] -> list of [num_patches * 128, lm_hidden] tensors, one per image, in input order."""
        if not images:
            return []
        param = self.vision_tokenizer.latents
        pixels = torch.cat([img.pixel_values for img in images]).to(device=param.device, dtype=param.dtype)
        features = siglip_features(self.vision_encoder, pixels)  # [P, 729, C]
        media, masks, counts = [], [], []
        offset = 0
        for img in images:
            n = img.pixel_values.shape[0]
            feats = features[offset : offset + n]
            offset += n
            counts.append(n)
            if img.grid is None:  # base-model path: one squashed image, no mask
                media.append(feats)
                masks.append(torch.ones(n, feats.shape[1], dtype=torch.bool, device=feats.device))
                continue
            npw, nph = img.grid
            chunks, mask = rechunk_grid_features(feats[1:], img.image_size, npw, nph, self.patches_per_side)
            media.append(torch.cat((feats[:1], chunks)))
            masks.append(torch.cat((torch.ones(1, feats.shape[1], dtype=torch.bool, device=feats.device), mask)))
        media_t = torch.cat(media)
        mask_t = torch.cat(masks)
        use_mask = None if bool(mask_t.all()) else mask_t
        tokens = self.vision_tokenizer(media_t, use_mask)  # [P, 128, H]
        return [t.reshape(-1, t.shape[-1]) for t in tokens.split(counts)]
