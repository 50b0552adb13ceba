"""Run a Phi-3 whose head size the selected vLLM attention kernel lacks, by zero-padding the heads.

vLLM's CPU paged-attention kernel (`CPU_ATTN`) supports head sizes 32, 64, 80, 96, ... only. The real xGen-MM has
96 and never needs this; the tiny test checkpoints (and the shared golden fixtures) have 16. Zero-padding q, k and v
to the next supported size with the *original* softmax scale is exact: the extra dimensions add 0 to every q·k and
the extra output columns (0) are dropped. The KV cache is then sized for the padded heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention


class HeadPaddedAttention(nn.Module):
    """Wraps an `Attention` built for `padded` head size; takes and returns tensors with `head_size` heads."""

    def __init__(self, attn: Attention, num_heads: int, num_kv_heads: int, head_size: int, padded: int):
        super().__init__()
        self.attn = attn
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_size, self.padded = head_size, padded

    def _pad(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return F.pad(x.reshape(-1, heads, self.head_size), (0, self.padded - self.head_size)).reshape(-1, heads * self.padded)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.attn(self._pad(q, self.num_heads), self._pad(k, self.num_kv_heads), self._pad(v, self.num_kv_heads))
        return out.reshape(-1, self.num_heads, self.padded)[..., : self.head_size].reshape(-1, self.num_heads * self.head_size)


def pad_unsupported_attention_heads(language_model: nn.Module, vllm_config: VllmConfig) -> int:
    """Replace each decoder layer's `self_attn.attn` by a head-padded one when the backend lacks its head size.

    Returns the padded head size (or 0 when nothing had to change)."""
    layers = getattr(getattr(language_model, "model", None), "layers", None) or []
    padded_to = 0
    forward_context = vllm_config.compilation_config.static_forward_context
    for layer in layers:
        self_attn = getattr(layer, "self_attn", None)
        attn = getattr(self_attn, "attn", None)
        if not isinstance(attn, Attention):
            continue
        backend = attn.attn_backend
        head_size = attn.head_size
        if backend.supports_head_size(head_size):
            return 0
        bigger = sorted(s for s in backend.get_supported_head_sizes() if s > head_size)
        if not bigger:
            raise ValueError(f"attention backend {backend.get_name()} supports no head size >= {head_size}")
        padded_to = bigger[0]
        prefix = attn.layer_name
        forward_context.pop(prefix, None)  # the padded layer takes over the name (and its KV cache)
        new_attn = Attention(
            attn.num_heads,
            padded_to,
            float(getattr(self_attn, "scaling", head_size**-0.5)),
            num_kv_heads=attn.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=prefix,
        )
        self_attn.attn = HeadPaddedAttention(new_attn, attn.num_heads, attn.num_kv_heads, head_size, padded_to)
    return padded_to
