"""Where images go in the token stream: each `<image>` becomes a run of that image's vision-token positions.

Instruct / interleave models (any-resolution): the `<image>` id is *replaced* by the image's 128 x patches positions.
Base model: the prompt carries `<image>` followed by 127 `<image placeholder>` ids and those 128 positions are
overwritten by the image's 128 tokens (a bare `<image>` is expanded to that form for convenience).
The fused token list keeps the placeholder ids at image positions; `ImageSpan`s say which image fills them, and the
image's content hash makes prefix caching image-aware.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spans import ImageSpan
from ..errors import ImageCountMismatchError
from ..special_tokens import IMAGE_PLACEHOLDER_TOKEN_ID, IMAGE_TOKEN_ID

BASE_IMAGE_TOKENS = 128


@dataclass(frozen=True)
class FusedPrompt:
    token_ids: list[int]
    image_spans: tuple[ImageSpan, ...]


def fuse_prompt(text_ids: list[int], images: list, base_model: bool = False) -> FusedPrompt:
    """text token ids with one `<image>` per image -> fused ids + image spans (images are `ProcessedImage`s).

    The request's image count is checked once, by the client before any pixel is decoded
    (`xgenmm.client.inputs.InputProcessor.check_image_tags`); a caller that skipped it still gets an
    `ImageCountMismatchError` here instead of a misaligned prompt."""
    fused: list[int] = []
    spans: list[ImageSpan] = []
    i, k = 0, 0
    while i < len(text_ids):
        tok = text_ids[i]
        if tok != IMAGE_TOKEN_ID:
            fused.append(tok)
            i += 1
            continue
        if k >= len(images):
            raise ImageCountMismatchError(f"the prompt has more <image> tags than the {len(images)} image(s) given")
        img = images[k]
        if base_model:
            run = 1
            while run < BASE_IMAGE_TOKENS and i + run < len(text_ids) and text_ids[i + run] == IMAGE_PLACEHOLDER_TOKEN_ID:
                run += 1
            if run not in (1, BASE_IMAGE_TOKENS):
                raise ImageCountMismatchError(
                    f"base-model image {k} has <image> followed by {run - 1} <image placeholder> tokens; "
                    f"expected {BASE_IMAGE_TOKENS - 1} (or none, to expand automatically)"
                )
            spans.append(ImageSpan(len(fused), BASE_IMAGE_TOKENS, img.content_hash, k))
            fused.extend([IMAGE_TOKEN_ID] + [IMAGE_PLACEHOLDER_TOKEN_ID] * (BASE_IMAGE_TOKENS - 1))
            i += run
        else:
            spans.append(ImageSpan(len(fused), img.num_vision_tokens, img.content_hash, k))
            fused.extend([IMAGE_TOKEN_ID] * img.num_vision_tokens)
            i += 1
        k += 1
    if k != len(images):
        raise ImageCountMismatchError(f"the prompt has {k} <image> tag(s) but {len(images)} image(s) were given")
    return FusedPrompt(fused, tuple(spans))
