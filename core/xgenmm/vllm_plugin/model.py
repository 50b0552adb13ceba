"""`XGenMMForVLLM`: xGen-MM (BLIP-3) v1.5 as a vLLM model.

* Language model: vLLM's own in-tree `Phi3ForCausalLM` (its paged attention, TP sharding, CUDA graphs), built with a
  32015-token vocabulary. The checkpoint's decoupled embedding / head are folded at load time: the [32015, H]
  embedding is `embed_tokens.weight[:32012]` + `additional_embedding.weight`, the [32015, H] head is
  `lm_head.weight[:32012]` + `additional_fc.weight`, and the head's bias (which stock Phi-3 lacks and vLLM's Llama
  head does not build) is `lm_head.bias[:32012]` + `additional_fc.bias`, added in `compute_logits`.
* Images: our `xgenmm.model.vision.VisionEncoder` (SigLIP + any-resolution re-chunking + mask + perceiver), the same
  module the native engine runs, replicated on every tensor-parallel rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ..model.config import XGenMMConfig
from ..model.cpu_linear import onednn_linear_available, use_onednn_linears
from ..model.vision import VisionEncoder
from ..special_tokens import IMAGE_TOKEN
from .head_padding import pad_unsupported_attention_heads
from .processing import (
    XGenMMDummyInputsBuilder,
    XGenMMMultiModalProcessor,
    XGenMMProcessingInfo,
    unpack_processed_images,
)

VISION_PREFIXES = {"vlm.vision_encoder.": "vision.vision_encoder.", "vlm.vision_tokenizer.": "vision.vision_tokenizer."}
LM_PREFIX = "vlm.lang_model."
UNUSED_PREFIXES = ("vlm.vision_encoder.head.",)  # SigLIP's attention-pooling head: in the checkpoint, never used
UNUSED_SUFFIXES = ("position_ids",)  # non-persistent buffers some exports carry

# Decoupled pieces (checkpoint key relative to the LM) -> (vLLM parameter, which half).
DECOUPLED = {
    "model.embed_tokens.weight": ("model.embed_tokens.weight", "base"),
    "model.embed_tokens.additional_embedding.weight": ("model.embed_tokens.weight", "extra"),
    "lm_head.weight": ("lm_head.weight", "base"),
    "lm_head.additional_fc.weight": ("lm_head.weight", "extra"),
    "lm_head.bias": ("lm_head.bias", "base"),
    "lm_head.additional_fc.bias": ("lm_head.bias", "extra"),
}


def fold_decoupled(base: torch.Tensor, extra: torch.Tensor, initial_len: int) -> torch.Tensor:
    """First `initial_len` rows of the base matrix (the rest are Phi-3 padding, never used) + the extra rows."""
    if base.shape[0] < initial_len:
        raise ValueError(f"decoupled base tensor has {base.shape[0]} rows, expected at least {initial_len}")
    return torch.cat([base[:initial_len], extra.to(base.dtype)], dim=0)


@MULTIMODAL_REGISTRY.register_processor(
    XGenMMMultiModalProcessor, info=XGenMMProcessingInfo, dummy_inputs=XGenMMDummyInputsBuilder
)
class XGenMMForVLLM(nn.Module, SupportsMultiModal):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError(f"xGen-MM takes images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        text = config.text_config
        self.initial_tokenizer_len = int(text.initial_tokenizer_len)
        xcfg = XGenMMConfig.from_dict(config.to_xgenmm_dict())
        self.tokens_per_patch = xcfg.perceiver.num_latents

        with self._mark_tower_model(vllm_config, "image"):
            self.vision = VisionEncoder(xcfg)

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=text, prefix=maybe_prefix(prefix, "language_model")
            )
            if isinstance(self.language_model.lm_head, ParallelLMHead):  # last pipeline stage
                self.language_model.lm_head = ParallelLMHead(
                    text.vocab_size,
                    text.hidden_size,
                    bias=True,
                    quant_config=vllm_config.quant_config,
                    prefix=maybe_prefix(prefix, "language_model.lm_head"),
                )
            pad_unsupported_attention_heads(self.language_model, vllm_config)

        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ---- images ---------------------------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        images = unpack_processed_images(
            pixel_values,
            kwargs["num_patches"],
            kwargs["image_sizes"],
            kwargs["image_grids"],
            self.tokens_per_patch,
        )
        return self.vision(images)  # one [128 * Np, H] tensor per image, in prompt order

    # ---- language model -------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        lm = self.language_model
        return lm.logits_processor(lm.lm_head, hidden_states, embedding_bias=lm.lm_head.bias)

    # ---- weights --------------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Official checkpoint keys (`vlm.*`) -> this module; returns the names of every parameter loaded."""
        vision_params = dict(self.vision.named_parameters(prefix="vision"))
        loaded: set[str] = set()
        halves: dict[str, dict[str, torch.Tensor]] = {}

        def lm_weights():
            for name, tensor in weights:
                if name.startswith(UNUSED_PREFIXES) or name.endswith(UNUSED_SUFFIXES):
                    continue
                target = next((new + name[len(old) :] for old, new in VISION_PREFIXES.items() if name.startswith(old)), None)
                if target is not None:
                    if not vision_params:  # tower not built (--limit-mm-per-prompt image=0): text only
                        continue
                    if target not in vision_params:
                        raise ValueError(f"checkpoint tensor {name!r} has no matching vision parameter ({target})")
                    default_weight_loader(vision_params[target], tensor)
                    loaded.add(target)
                    continue
                if not name.startswith(LM_PREFIX):
                    raise ValueError(f"unexpected checkpoint tensor {name!r} (xGen-MM keys start with 'vlm.')")
                lm_name = name[len(LM_PREFIX) :]
                if lm_name in DECOUPLED:
                    param, half = DECOUPLED[lm_name]
                    halves.setdefault(param, {})[half] = tensor
                    if len(halves[param]) == 2:
                        parts = halves.pop(param)
                        yield param, fold_decoupled(parts["base"], parts["extra"], self.initial_tokenizer_len)
                    continue
                yield lm_name, tensor

        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(lm_weights())}
        if halves:
            missing = {param: sorted(set(("base", "extra")) - set(parts)) for param, parts in halves.items()}
            raise ValueError(f"incomplete decoupled embedding / head in the checkpoint: {missing}")
        self._use_native_vision_linears()
        return loaded

    def _use_native_vision_linears(self) -> None:
        """The vision tower on the linears the native engine gives it (oneDNN on CPU, `model/cpu_linear.py`), so
        a comparison of the two backends compares engines, not vision kernels."""
        param = next(self.vision.parameters(), None)
        if param is not None and onednn_linear_available(param.device, param.dtype):
            use_onednn_linears(self.vision)
