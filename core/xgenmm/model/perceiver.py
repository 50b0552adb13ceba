"""The perceiver resampler ("vision tokenizer"): 729 SigLIP tokens per patch -> 128 LM-ready tokens.

Module and parameter names mirror the official checkpoint (`latents`, `layers.{i}.0.*` attention,
`layers.{i}.1.{0,1,3}` feed-forward, `norm`, `projection`) so weights load by name. Every patch is an independent
sample; padding tokens of the any-resolution canvas are masked out of the keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import PerceiverConfig


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """media [P, N, D] (raw features, normalised here every layer), latents [P, L, D], key_mask [P, N] bool."""
        p, n_lat = latents.shape[0], latents.shape[1]
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((media, latents), dim=1)).chunk(2, dim=-1)
        # "(h d)" with h outer: head i owns features [i*dh, (i+1)*dh).
        q = q.view(p, n_lat, self.heads, -1).transpose(1, 2)
        k = k.view(p, k.shape[1], self.heads, -1).transpose(1, 2)
        v = v.view(p, v.shape[1], self.heads, -1).transpose(1, 2)
        mask = None
        if key_mask is not None:  # masked keys get -inf; the latent keys are never masked
            mask = torch.cat((key_mask, key_mask.new_ones(p, n_lat)), dim=1)[:, None, None, :]
        # Same math as upstream's explicit softmax(q*scale @ k^T - max) @ v, as one fused kernel.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(p, n_lat, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, cfg.dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), _feed_forward(cfg.dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.projection = nn.Linear(cfg.dim, cfg.output_dim)

    def forward(self, media: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """media [P, N, D] -> [P, num_latents, output_dim]."""
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents, key_mask) + latents
            latents = ff(latents) + latents
        return self.projection(self.norm(latents))
