"""vLLM multimodal processing for xGen-MM: our any-resolution `ImageProcessor` and the `<image>` expansion.

vLLM tokenises the prompt itself; this processor turns the images into patch tensors (`_call_hf_processor`, no HF
processor class involved) and tells vLLM how many placeholder tokens each image takes:

* instruct / interleave / dpo checkpoints (anyres): each `<image>` (32012) becomes 128·Np `<image>` ids, one per
  vision token (Np = 1 base patch + the grid tiles: 3, 4 or 5);
* the base checkpoint: the prompt already holds `<image>` + 127 `<image placeholder>` (32013) per image; those 128
  ids are overwritten by the image's 128 tokens of one 384x384 squashed patch.

The image (W, H) and grid travel with the pixels because the model's re-chunking and padding mask need them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature

from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from ..multimodal.image_processing import DEFAULT_TOKENS_PER_PATCH, ImageProcessor, ProcessedImage
from ..special_tokens import IMAGE_PLACEHOLDER_TOKEN, IMAGE_PLACEHOLDER_TOKEN_ID, IMAGE_TOKEN, IMAGE_TOKEN_ID
from .hf_config import XGenMMVllmConfig

# The (W, H) whose anyres grid is 2x2, i.e. the most patches (5) and vision tokens (640) an image can take.
LARGEST_IMAGE_WH = (768, 768)


class XGenMMProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> XGenMMVllmConfig:
        return self.ctx.get_hf_config(XGenMMVllmConfig)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # our processor takes no per-request options (there is no HF processor to ask)

    @cached_property
    def image_processor(self) -> ImageProcessor:
        """Same construction as `ImageProcessor.from_pretrained`, from the files vLLM already read."""
        hf_config = self.get_hf_config()
        preprocessor = dict(self.ctx.get_hf_image_processor_config() or {})
        if not preprocessor:
            preprocessor = {"image_aspect_ratio": "anyres"}  # no preprocessor_config.json: instruct defaults
        tokens = int(hf_config.vision_tokenizer_config.get("num_vis_tokens", DEFAULT_TOKENS_PER_PATCH))
        return ImageProcessor.from_config_dict(
            preprocessor,
            default_grids=hf_config.vision_encoder_config.get("anyres_grids"),
            tokens_per_patch=tokens,
        )

    @property
    def is_base_model(self) -> bool:
        return not self.image_processor.anyres

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        proc = self.image_processor
        return {"image": proc.expected_num_vision_tokens(LARGEST_IMAGE_WH)}


class XGenMMDummyInputsBuilder(BaseDummyInputsBuilder[XGenMMProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        n = mm_counts.get("image", 0)
        if self.info.is_base_model:
            tokens = self.info.image_processor.tokens_per_patch
            return (IMAGE_TOKEN + IMAGE_PLACEHOLDER_TOKEN * (tokens - 1)) * n
        return IMAGE_TOKEN * n

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options):
        width, height = LARGEST_IMAGE_WH
        return {
            "image": self._get_dummy_images(
                width=width,
                height=height,
                num_images=mm_counts.get("image", 0),
                overrides=(mm_options or {}).get("image"),
            )
        }


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)  # CHW -> HWC
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 255).astype(np.uint8)
        return Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
    raise TypeError(f"unsupported image type {type(image).__name__}: expected a PIL image or an HWC uint8 array")


def pack_processed_images(images: Sequence[ProcessedImage]) -> dict[str, torch.Tensor]:
    """Flat tensors for vLLM: all patches stacked, plus per-image patch counts, (W, H) and grid ((0, 0) = base path)."""
    return {
        "pixel_values": torch.cat([img.pixel_values for img in images]),
        "num_patches": torch.tensor([img.num_patches for img in images], dtype=torch.long),
        "image_sizes": torch.tensor([list(img.image_size) for img in images], dtype=torch.long),
        "image_grids": torch.tensor([list(img.grid or (0, 0)) for img in images], dtype=torch.long),
    }


def unpack_processed_images(
    pixel_values: torch.Tensor, num_patches, image_sizes, image_grids, tokens_per_patch: int
) -> list[ProcessedImage]:
    """Inverse of `pack_processed_images` (the model side)."""
    counts = [int(n) for n in torch.as_tensor(num_patches).reshape(-1).tolist()]
    sizes = torch.as_tensor(image_sizes).reshape(-1, 2).tolist()
    grids = torch.as_tensor(image_grids).reshape(-1, 2).tolist()
    if isinstance(pixel_values, (list, tuple)):
        pixel_values = torch.cat([p.reshape(-1, *p.shape[-3:]) for p in pixel_values])
    pixel_values = pixel_values.reshape(-1, *pixel_values.shape[-3:])
    out = []
    for chunk, (w, h), (gw, gh) in zip(pixel_values.split(counts), sizes, grids):
        out.append(
            ProcessedImage(
                pixel_values=chunk,
                image_size=(int(w), int(h)),
                grid=None if gw == 0 else (int(gw), int(gh)),
                content_hash="",
                tokens_per_patch=tokens_per_patch,
            )
        )
    return out


class XGenMMMultiModalProcessor(BaseMultiModalProcessor[XGenMMProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = hf_data.get("images") or []
        if not isinstance(images, (list, tuple)):
            images = [images]
        processor = self.info.image_processor
        processed = [processor(_as_pil(image)) for image in images]
        return BatchFeature(pack_processed_images(processed) if processed else {})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_patches = hf_inputs.get("num_patches", torch.empty(0, dtype=torch.long))
        return dict(
            pixel_values=MultiModalFieldConfig.flat_from_sizes("image", num_patches),
            num_patches=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            image_sizes=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            image_grids=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        )

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        tokens_per_patch = self.info.image_processor.tokens_per_patch
        if self.info.is_base_model:
            span = [IMAGE_TOKEN_ID] + [IMAGE_PLACEHOLDER_TOKEN_ID] * (tokens_per_patch - 1)
            return [PromptReplacement(modality="image", target=span, replacement=span)]

        def replacement(item_idx: int) -> list[int]:
            num_patches = int(out_mm_kwargs["image"][item_idx]["num_patches"].data)
            return [IMAGE_TOKEN_ID] * (tokens_per_patch * num_patches)

        return [PromptReplacement(modality="image", target=[IMAGE_TOKEN_ID], replacement=replacement)]

    def apply(self, inputs, timing_ctx):
        """Refuse a prompt whose `<image>` count differs from its image count (vLLM would silently keep extra
        `<image>` ids as text), as the native engine does with `ImageCountMismatchError`."""
        num_images = inputs.mm_data_items.get_count("image", strict=False)
        num_tags = sum(1 for t in inputs.prompt if t == IMAGE_TOKEN_ID)
        if num_tags != num_images:
            raise ValueError(
                f"the prompt has {num_tags} <image> tag(s) but {num_images} image(s) were given; "
                "each <image> takes the next image"
            )
        return super().apply(inputs, timing_ctx)
