"""xGen-MM: vision encoder + perceiver + Phi-3, with the decoupled embedding / LM head and image fusion.

The official checkpoint splits the vocabulary: ids <= 32011 use `embed_tokens.weight` / `lm_head.{weight,bias}`
rows, ids 32012..32014 use `additional_embedding` / `lm_head.additional_fc`. The loader folds both halves into one
[32015, hidden] embedding and one [32015, hidden] head with a [32015] bias, so a lookup or a logits matmul is a single
op and logit index k is token id k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.base import AttentionBackend, AttentionMetadata, KVCache
from .config import XGenMMConfig
from .cpu_linear import (bf16_kernel_available, bf16_kernel_linear, f32_kernel_available, onednn_linear, use_aten_linears,
                         use_onednn_linears, use_packed_bf16_linears, use_packed_f32_linears, vision_prefers_aten)
from .phi3 import Phi3Decoder
from .vision import VisionEncoder


class XGenMMForConditionalGeneration(nn.Module):
    def __init__(self, config: XGenMMConfig, vision_attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        text = config.text
        vocab = text.effective_vocab_size
        self.vision = VisionEncoder(config, vision_attn_implementation)
        self.language_model = Phi3Decoder(text)
        self.embed_weight = nn.Parameter(torch.empty(vocab, text.hidden_size))
        self.lm_head_weight = nn.Parameter(torch.empty(vocab, text.hidden_size))
        self.lm_head_bias = nn.Parameter(torch.empty(vocab))
        self.linear_kernel = "torch"  # "onednn" / "onednn+xgenmm_bf16" / "onednn+xgenmm_f32": see `use_onednn_linears`
        self.lm_head_quantized: nn.Module | None = None  # set (and lm_head_weight freed) by model/quant/

    def use_onednn_linears(self) -> int:
        """CPU linears (see `cpu_linear.py`): oneDNN for every layer, except that in bf16 the language model and its
        head run our batch-invariant kernel where it is built, in float32 on AVX2 CPUs the language model runs our
        packed float32 kernel (`f32_kernel_available`; the head stays on oneDNN), and a float32 vision tower on AVX2
        CPUs keeps ATen's GEMM (`vision_prefers_aten`). `linear_kernel` names the language model's: "onednn",
        "onednn+xgenmm_bf16" or "onednn+xgenmm_f32". Returns the layers switched to oneDNN."""
        count = use_onednn_linears(self)
        vision_weight = self.vision.vision_tokenizer.latents
        if vision_prefers_aten(vision_weight.dtype):
            count -= use_aten_linears(self.vision)  # large-row GEMMs: ATen's sgemm is faster on AVX2 CPUs
        weight = self.lm_head_weight
        if weight is not None and bf16_kernel_available(weight.device, weight.dtype):
            from ..cpu_kernels import to_hugepages

            count -= use_packed_bf16_linears(self.language_model)  # packed into 2 MiB pages
            self.lm_head_weight.data = to_hugepages(self.lm_head_weight.data)  # decode streams it every step
            self.linear_kernel = "onednn+xgenmm_bf16"
        elif weight is not None and f32_kernel_available(weight.device, weight.dtype):
            count -= use_packed_f32_linears(self.language_model)  # a quantized model's int8 layers are not float32
            self.linear_kernel = "onednn+xgenmm_f32"
        else:
            self.linear_kernel = "onednn"
        return count

    @property
    def vocab_size(self) -> int:
        return self.embed_weight.shape[0]

    def reset_buffers(self) -> None:
        """Rebuild non-persistent buffers (after materialising a meta-device model)."""
        self.vision.reset_buffers()
        self.language_model.rotary.reset_buffers()

    def encode_images(self, images) -> list[torch.Tensor]:
        """list[ProcessedImage] -> LM-ready vision tokens per image ([num_patches * 128, hidden])."""
        return self.vision(images)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_weight)

    def forward_hidden(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
        backend: AttentionBackend,
        output_hidden_states: bool = False,
    ):
        return self.language_model(inputs_embeds, positions, meta, kv_caches, backend, output_hidden_states)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, 32015] float32 logits (decoupled head, with its bias)."""
        if self.lm_head_quantized is not None:  # float32 in, float32 logits out: its float32 accumulation is kept
            # (logits rounded to bf16 tie near-equal tokens, and any upstream rounding difference then picks a side)
            return self.lm_head_quantized(hidden.float())
        if self.linear_kernel == "onednn+xgenmm_bf16":
            return bf16_kernel_linear(hidden, self.lm_head_weight, self.lm_head_bias).float()
        if self.linear_kernel in ("onednn", "onednn+xgenmm_f32"):
            return onednn_linear(hidden, self.lm_head_weight, self.lm_head_bias).float()
        return F.linear(hidden, self.lm_head_weight, self.lm_head_bias).float()


def fuse_embeddings(
    model: XGenMMForConditionalGeneration,
    input_ids: torch.Tensor,  # [T]
    image_rows: torch.Tensor | None,  # [T_img] positions within the T tokens that hold vision tokens
    image_embeds: torch.Tensor | None,  # [T_img, hidden]
) -> torch.Tensor:
    """Text embeddings with the vision tokens written over the image positions."""
    embeds = model.embed_tokens(input_ids)
    if image_rows is not None and image_rows.numel():
        embeds = embeds.index_copy(0, image_rows, image_embeds.to(embeds.dtype))
    return embeds
