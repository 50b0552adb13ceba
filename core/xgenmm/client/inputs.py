"""Requests in, checked, once: prompt parsing, tokenization, image opening / decoding / tiling, the image count,
fusion, the context budget and the grammar, on the client's side of the engine core.

Everything that can fail on bad input fails here, in the caller's thread, for that request alone; an engine core
only ever sees prepared requests (`xgenmm.engine.request.PreparedRequest`). Budgets come before work: images are
opened header-only (each exactly once: a chat's images come already opened by the renderer and are not opened
again), so their count, their pixels (each and together) and the prompt length with their vision tokens are checked
before any pixel is decoded; then they are decoded one at a time (at most `max_concurrent_image_decodes` per engine),
tiled when the core wants tiles, and memory held by a large decode is handed back to the OS. The same prompt forms
(vLLM's `str` / `{"prompt" | "prompt_token_ids", "multi_modal_data"}`), tokenizer (upstream-exact ids), image policy,
checks and `max_tokens` clamping serve every core; the core's `CoreInputSpec` says what it wants (tiles and a fused
prompt for the native core, decoded images for vLLM).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import operator
import threading
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import (
    ImageCountMismatchError,
    ImageTooLargeError,
    PromptError,
    PromptTooLongError,
    SamplingParamsError,
)
from ..engine.request import CoreInputSpec, PreparedRequest
from ..multimodal.fusion import fuse_prompt
from ..multimodal.image_processing import ImageProcessor, ProcessedImage
from ..multimodal.image_sources import ImageInputPolicy, decode_image, load_image
from ..sampling_params import SamplingParams
from ..special_tokens import IMAGE_TOKEN_ID

__all__ = ["InputProcessor", "ParsedPrompt", "PROMPT_FIELDS", "release_freed_memory"]

PROMPT_FIELDS = frozenset({"prompt", "prompt_token_ids", "multi_modal_data"})
# After decoding images of at least this many pixels in one request, hand freed heap back to the OS.
TRIM_AFTER_PIXELS = 16 * 1024 * 1024


def _load_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): the allocator keeps what it keeps
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> bool:
    """Return freed heap pages to the OS (glibc `malloc_trim`); a decoded multi-megapixel image otherwise stays in the
    process's resident memory after it is freed. False where the C library has no such call."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt as given: its text (None for token ids only), its token ids (one `<image>` per image) and the image
    references in `<image>` order (not loaded yet)."""

    text: str | None
    token_ids: list[int]
    images: list[Any]


class InputProcessor:
    """Turns caller prompts into checked, prepared requests for one engine core (see the module docstring).
    Thread-safe. `grammar_compiler` (a `xgenmm.structured.GrammarCompiler`, or None for a core that validates
    grammars itself) compiles each request's grammar once; the core spawns one matcher per sample from it."""

    def __init__(self, tokenizer, image_processor: ImageProcessor, spec: CoreInputSpec, *,
                 default_image_policy: ImageInputPolicy, max_concurrent_image_decodes: int = 2,
                 grammar_compiler=None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.spec = spec
        self.is_base_model = not image_processor.anyres
        self.vocab_size = spec.vocab_size
        self.max_model_len = spec.max_model_len
        self.max_images_per_prompt = spec.max_images_per_prompt
        self.default_image_policy = default_image_policy
        self.grammar_compiler = grammar_compiler
        self._decode_slots = threading.BoundedSemaphore(max(1, max_concurrent_image_decodes))

    # ---- the two entry points --------------------------------------------------------------------------------------
    def process(self, prompt: Any, params: SamplingParams | None, request_id: str,
                image_policy: ImageInputPolicy | None = None) -> PreparedRequest:
        """A vLLM-shaped prompt: parse, tokenize, open its images (headers), then `prepare`."""
        params = self.check_params(params)
        parsed = self.parse(prompt)
        opened = self.load_images(parsed.images, image_policy, request_id)  # headers only
        return self._prepare(parsed, opened, params, request_id)

    def process_opened(self, text: str | None, token_ids: list[int], images: list[Any], params: SamplingParams | None,
                       request_id: str, image_policy: ImageInputPolicy | None = None) -> PreparedRequest:
        """A prompt whose images the caller already opened (header-only PIL images, e.g. the chat renderer's, under
        the same policy): they are not opened again; the per-request limits are checked here."""
        params = self.check_params(params)
        self.check_request_images(images, image_policy or self.default_image_policy, request_id)
        return self._prepare(ParsedPrompt(text, list(token_ids), []), list(images), params, request_id)

    def _prepare(self, parsed: ParsedPrompt, opened: list[Any], params: SamplingParams,
                 request_id: str) -> PreparedRequest:
        self.check_image_tags(parsed.token_ids, len(opened), request_id)  # the request's one image-count check
        # Budgets before work: the context must hold the prompt with every image's vision tokens.
        fused_length = self.fused_length(parsed.token_ids, opened)
        params = self.fit_to_context(params, fused_length, request_id)
        grammar = None
        if params.structured_outputs is not None and self.grammar_compiler is not None:
            grammar = self.grammar_compiler.compile_grammar(params.structured_outputs)  # a bad one fails alone, now
        tiles = self.spec.tiles_images
        if not tiles and any(isinstance(im, ProcessedImage) for im in opened):
            raise PromptError("this backend tiles images itself and needs the source images (PIL, bytes, path, "
                              "URL, ...), not already processed ProcessedImages")
        images = self.decode_images(opened, request_id, tile=tiles)
        fused = None
        if tiles:
            fused = fuse_prompt(parsed.token_ids, images, base_model=self.is_base_model)
            fused_length = len(fused.token_ids)
            params = self.fit_to_context(params, fused_length, request_id)
        return PreparedRequest(request_id, parsed.text, parsed.token_ids, images, fused, params, fused_length, grammar)

    # ---- shared parts ---------------------------------------------------------------------------------------------
    @staticmethod
    def check_params(params: SamplingParams | None) -> SamplingParams:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise SamplingParamsError(f"sampling_params must be a SamplingParams, got {type(params).__name__}",
                                      field="sampling_params")
        return params

    def parse(self, prompt: Any) -> ParsedPrompt:
        """vLLM's prompt forms -> text, ids and image references; a text prompt is tokenized here."""
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict):
            raise PromptError(f"a prompt must be a str or a dict with 'prompt' or 'prompt_token_ids', got {type(prompt).__name__}")
        unknown = set(prompt) - PROMPT_FIELDS
        if unknown:
            raise PromptError(f"unknown prompt field(s) {sorted(unknown)}")
        mm = prompt.get("multi_modal_data") or {}
        if set(mm) - {"image"}:
            raise PromptError(f"unsupported modality {sorted(set(mm) - {'image'})}: xGen-MM takes images only")
        images = mm.get("image", [])
        if not isinstance(images, (list, tuple)):
            images = [images]
        if "prompt_token_ids" in prompt:
            try:
                ids = [operator.index(t) for t in prompt["prompt_token_ids"]]
            except TypeError:
                raise PromptError("prompt_token_ids must be a list of int token ids") from None
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise PromptError(f"prompt_token_ids contains ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
            return ParsedPrompt(prompt.get("prompt"), ids, list(images))
        if "prompt" not in prompt:
            raise PromptError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        text = prompt["prompt"]
        if not isinstance(text, str):
            raise PromptError(f"'prompt' must be a string, got {type(text).__name__}")
        return ParsedPrompt(text, list(self.tokenizer(text, add_special_tokens=False).input_ids), list(images))

    def load_images(self, images: list[Any], image_policy: ImageInputPolicy | None, request_id: str) -> list[Any]:
        """Open every image reference under the policy, header only (PIL images out; `ProcessedImage`s pass
        through), after the per-request image limit; the request's total pixels are checked before any pixel is
        decoded."""
        self._check_count(images, request_id)
        policy = image_policy or self.default_image_policy
        out = [image if isinstance(image, ProcessedImage) else load_image(image, policy, what=f"image {index}",
                                                                            decode=False)
               for index, image in enumerate(images)]
        self._check_total_pixels(out, policy, request_id)
        return out

    def check_request_images(self, images: list[Any], policy: ImageInputPolicy, request_id: str) -> None:
        """The per-request limits (image count, total pixels) for images that are already open."""
        self._check_count(images, request_id)
        self._check_total_pixels(images, policy, request_id)

    def _check_count(self, images: list[Any], request_id: str) -> None:
        if len(images) > self.max_images_per_prompt:
            raise PromptError(f"request {request_id!r} has {len(images)} images; the limit is "
                              f"{self.max_images_per_prompt} (engine option max_images_per_prompt)")

    @staticmethod
    def _check_total_pixels(images: list[Any], policy: ImageInputPolicy, request_id: str) -> None:
        limit = policy.max_request_image_pixels
        total = sum(im.size[0] * im.size[1] for im in images if isinstance(im, Image.Image))
        if limit is not None and total > limit:
            raise ImageTooLargeError(f"request {request_id!r}: its images have {total} pixels together; the limit "
                                     f"per request is {limit}")

    def decode_images(self, images: list[Any], request_id: str, *, tile: bool) -> list[Any]:
        """Decode header-only images one at a time, in place in `images` (at most `max_concurrent_image_decodes` in
        this engine at once); with `tile`, each becomes its `ProcessedImage` and its decoded pixels are let go
        before the next one is decoded."""
        pixels = 0
        for index, image in enumerate(images):
            if isinstance(image, ProcessedImage):
                continue
            pixels += image.size[0] * image.size[1]
            with self._decode_slots:
                decode_image(image, what=f"image {index}")
                if tile:
                    images[index] = self._tile(image)  # our list no longer holds the decoded pixels
            del image
        if pixels >= TRIM_AFTER_PIXELS:
            release_freed_memory()
        return images

    def check_image_tags(self, token_ids: list[int], num_images: int, request_id: str) -> None:
        num_tags = token_ids.count(IMAGE_TOKEN_ID)
        if num_tags != num_images:
            raise ImageCountMismatchError(f"request {request_id!r}: the prompt has {num_tags} <image> tag(s) but "
                                          f"{num_images} image(s) were given; each <image> takes the next image")

    def fused_length(self, token_ids: list[int], images: list[Image.Image]) -> int:
        """How many positions the prompt takes once every `<image>` is replaced by its vision tokens."""
        if self.is_base_model:  # the base prompt already holds 128 ids per image
            return len(token_ids)
        return len(token_ids) + sum(self._vision_tokens(image) - 1 for image in images)

    def _vision_tokens(self, image: Image.Image) -> int:
        """Vision tokens of an opened (not decoded) image. A transposed size gives the same count whenever the
        anyres grids are symmetric (the official ones are), so the EXIF orientation, which for a PNG can only be
        read by decoding it, is consulted only when it matters."""
        width, height = image.size
        as_is = self.image_processor.expected_num_vision_tokens((width, height))
        if as_is == self.image_processor.expected_num_vision_tokens((height, width)):
            return as_is
        return self.image_processor.expected_num_vision_tokens(self.oriented_size(image))

    def fit_to_context(self, params: SamplingParams, prompt_length: int, request_id: str) -> SamplingParams:
        """Refuse a prompt that fills the context; clamp `max_tokens` to what is left (None = all of it, as vLLM)."""
        if prompt_length >= self.max_model_len:
            raise PromptTooLongError(f"request {request_id!r}: the prompt is {prompt_length} tokens (with image "
                                     f"tokens); the context is {self.max_model_len}")
        room = self.max_model_len - prompt_length
        if params.max_tokens is None or params.max_tokens > room:
            params = params.replace(max_tokens=max(1, room))
        return params

    def oriented_size(self, image: Image.Image) -> tuple[int, int]:
        """(W, H) as the image processor will see it (after the EXIF orientation it applies)."""
        width, height = image.size
        if not self.image_processor.apply_exif_orientation:
            return width, height
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:
            return width, height
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)

    # ---- internals ------------------------------------------------------------------------------------------------
    def _tile(self, image: Any) -> ProcessedImage:
        if isinstance(image, ProcessedImage):
            return image
        return self.image_processor.process_base(image) if self.is_base_model else self.image_processor(image)
