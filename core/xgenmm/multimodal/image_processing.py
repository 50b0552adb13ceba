"""Any-resolution image tiling, bit-exact with the official xGen-MM v1.5 preprocessing.

Upstream (HF ``image_processing_blip_3.py`` / LAVIS ``any_res_data_utils.py``) does, per image:
``select_best_resolution`` over the anyres grids -> PIL ``resize`` (default BICUBIC) keeping the aspect ratio ->
paste centred on a black canvas -> 384x384 crops row-major; plus a "base" patch = the whole image squash-resized
to 384x384, prepended. Each patch is then ``ToTensor`` + ``Normalize``. We call the very same PIL resizes (the only
step that computes new pixel values) and do the copies (paste, crop) and the normalisation with torch, in the same
float32 operation order as torchvision, so the tensors are identical bit for bit (see tests/test_image_processing.py).

Input normalisation (what upstream gets from the demo's ``Image.open(...).convert('RGB')``), in this order:

* the pixel limit is checked on ``image.size`` before anything is decoded (``Image.open`` is lazy);
* the EXIF orientation tag is applied (``ImageOps.exif_transpose``), so the model sees the picture the way a viewer
  shows it (upstream ignores the tag; a deliberate, documented deviation);
* the mode is converted to RGB exactly like ``image.convert('RGB')``: alpha (RGBA, LA, PA, P with transparency) is
  **dropped, not composited** — the colour stored under a transparent pixel is what the model sees, as upstream;
  L / 1 / CMYK / YCbCr / HSV / LAB / F / I use Pillow's conversions (I and F clip to 0..255, as upstream);
* 16-bit integer modes (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) are the one exception: Pillow's ``convert('RGB')``
  clips them to 0..255 (a 16-bit photo turns nearly white), so we rescale ``v*255/65535`` (rounded) instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from xgenmm.errors import ConfigError, ImageError, ImageTooLargeError

__all__ = [
    "DEFAULT_ANYRES_GRIDS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_TOKENS_PER_PATCH",
    "ImageProcessor",
    "ProcessedImage",
    "check_image_pixels",
    "ensure_pil_pixel_limit_at_least",
    "image_content_hash",
    "select_best_resolution",
    "to_rgb",
]

# (width, height) in pixels, in the official order (the order decides ties).
DEFAULT_ANYRES_GRIDS: tuple[tuple[int, int], ...] = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # 64 MiP: a 8192x8192 picture; 192 MiB once decoded as RGB
DEFAULT_TOKENS_PER_PATCH = 128  # perceiver latents per patch (vision_tokenizer_config.num_vis_tokens)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_EXIF_ORIENTATION_TAG = 0x0112
_HASH_DOMAIN = b"xgenmm-rgb8-v1\0"


# --------------------------------------------------------------------------------------------------------------
# Grid selection (pure arithmetic, shared with the vision encoder)
# --------------------------------------------------------------------------------------------------------------


def select_best_resolution(
    image_size_wh: Sequence[int], grids: Iterable[Sequence[int]] = DEFAULT_ANYRES_GRIDS
) -> tuple[int, int]:
    """The LLaVA-NeXT rule used by upstream: the candidate (w, h) keeping the most original pixels.

    ``eff = min(int(W*s) * int(H*s), W*H)`` with ``s = min(w/W, h/H)``; the largest ``eff`` wins, ties go to the
    smaller wasted area ``w*h - eff``, a remaining tie to the earlier candidate (strict comparisons).
    """
    original_w, original_h = int(image_size_wh[0]), int(image_size_wh[1])
    if original_w <= 0 or original_h <= 0:
        raise ImageError(f"image size must be positive, got {original_w}x{original_h}")
    best: tuple[int, int] | None = None
    max_effective = 0
    min_wasted = float("inf")
    for candidate in grids:
        width, height = int(candidate[0]), int(candidate[1])
        scale = min(width / original_w, height / original_h)
        downscaled_w, downscaled_h = int(original_w * scale), int(original_h * scale)
        effective = min(downscaled_w * downscaled_h, original_w * original_h)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective = effective
            min_wasted = wasted
            best = (width, height)
    if best is None:
        raise ConfigError("select_best_resolution needs at least one grid candidate")
    return best


def _resized_size_in_grid(image_size_wh: tuple[int, int], target_wh: tuple[int, int]) -> tuple[int, int]:
    """Size of the aspect-preserving resize inside the target canvas (upstream ``resize_and_pad_image``)."""
    original_w, original_h = image_size_wh
    target_w, target_h = target_wh
    scale_w = target_w / original_w
    scale_h = target_h / original_h
    if scale_w < scale_h:
        # Same float operation order as upstream: the scale is computed first, then multiplied.
        return target_w, min(math.ceil(original_h * scale_w), target_h)
    return min(math.ceil(original_w * scale_h), target_w), target_h


# --------------------------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------------------------


def ensure_pil_pixel_limit_at_least(max_pixels: int | None) -> None:
    """Make Pillow's decompression-bomb guard no stricter than our own limit.

    ``Image.open`` warns above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that, before we get to check the
    size ourselves. We only ever *raise* Pillow's global threshold (to our limit), so our typed limit is the one that
    decides for every size up to it, and we never weaken a stricter setting made by the application to nothing.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None:
        return
    if max_pixels is None:
        Image.MAX_IMAGE_PIXELS = None
    elif current < max_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def check_image_pixels(size_wh: Sequence[int], max_pixels: int | None, *, what: str = "image") -> None:
    """Raise ``ImageTooLargeError`` when ``W*H`` exceeds ``max_pixels`` (None = unlimited)."""
    width, height = int(size_wh[0]), int(size_wh[1])
    if width <= 0 or height <= 0:
        raise ImageError(f"{what}: image has an empty size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels} pixels"
        )


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """``ImageOps.exif_transpose`` only when the tag asks for it (avoids a full copy in the common case)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not make a decodable picture unusable
        return image
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        transposed = ImageOps.exif_transpose(image)
        return transposed if transposed is not None else image
    return image


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Rescale a 16-bit single-channel image to 8 bits (``round(v*255/65535)``) and replicate it to RGB. Done on the
    uint16 array with one uint32 temporary (decode_cost.py counts these bytes against the image budget)."""
    values = np.asarray(image)
    if values.dtype.kind not in "ui" or values.dtype.itemsize != 2:
        values = np.asarray(image.convert("I"), dtype=np.int64).clip(0, 65535)
    eight_bit = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(eight_bit, "L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as mode RGB, matching ``image.convert('RGB')`` (alpha dropped), except 16-bit modes (rescaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if mode == "P" and isinstance(image.info.get("transparency"), bytes):
        # convert('RGB') would give the same pixels but warns; via RGBA the palette colours are identical.
        return image.convert("RGBA").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        # Modes Pillow cannot take straight to RGB (e.g. premultiplied "La"): go through RGBA, then drop alpha.
        try:
            return image.convert("RGBA").convert("RGB")
        except ValueError as exc:
            raise ImageError(f"unsupported image mode {mode!r}: cannot convert it to RGB") from exc


def image_content_hash(rgb_image: Image.Image) -> str:
    """sha256 of the decoded RGB pixels and the size: the same picture hashes the same in PNG, BMP, WebP, ..."""
    if rgb_image.mode != "RGB":
        raise ImageError(f"image_content_hash needs an RGB image, got mode {rgb_image.mode!r}")
    width, height = rgb_image.size
    digest = hashlib.sha256(_HASH_DOMAIN)
    digest.update(f"{width}x{height}\0".encode("ascii"))
    digest.update(rgb_image.tobytes())
    return digest.hexdigest()


def _rgb_to_uint8_chw(rgb_image: Image.Image) -> torch.Tensor:
    width, height = rgb_image.size
    flat = torch.frombuffer(bytearray(rgb_image.tobytes()), dtype=torch.uint8)
    return flat.view(height, width, 3).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------------------------
# Output type
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    """One image ready for the vision encoder.

    ``pixel_values``: float32 [Np, 3, P, P], patch order [base squash, grid tiles row-major];
    ``image_size``: the (W, H) the tiles were computed from (after EXIF orientation) — the model's ``image_size``;
    ``grid``: (patches wide, patches tall), or None on the base-model path (Np == 1);
    ``content_hash``: sha256 hex of the decoded RGB pixels + size (cache key, container independent).
    """

    pixel_values: torch.Tensor
    image_size: tuple[int, int]
    grid: tuple[int, int] | None
    content_hash: str
    tokens_per_patch: int = DEFAULT_TOKENS_PER_PATCH

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_vision_tokens(self) -> int:
        return self.tokens_per_patch * self.num_patches


# --------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------


def _as_channel_triplet(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    try:
        triplet = tuple(float(v) for v in value)
    except TypeError as exc:
        raise ConfigError(f"{name} must be a number or 3 numbers, got {value!r}") from exc
    if len(triplet) == 1:
        triplet = triplet * 3
    if len(triplet) != 3:
        raise ConfigError(f"{name} must have 3 values (one per RGB channel), got {value!r}")
    return triplet  # type: ignore[return-value]


class ImageProcessor:
    """PIL image -> ``ProcessedImage``; anyres tiling (instruct models) or one 384 squash (base model).

    ``max_image_pixels`` (None = unlimited) refuses larger images with ``ImageTooLargeError``; it is checked on the
    (lazy) PIL size before any pixel is decoded.
    """

    def __init__(
        self,
        grids: Iterable[Sequence[int]] | None = DEFAULT_ANYRES_GRIDS,
        patch_size: int = 384,
        image_mean: Sequence[float] | float = (0.5, 0.5, 0.5),
        image_std: Sequence[float] | float = (0.5, 0.5, 0.5),
        anyres: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        *,
        tokens_per_patch: int = DEFAULT_TOKENS_PER_PATCH,
        interpolation_mode: str = "bicubic",
        resize_mode: str = "squash",
        apply_exif_orientation: bool = True,
    ) -> None:
        if int(patch_size) <= 0:
            raise ConfigError(f"patch_size must be positive, got {patch_size}")
        self.patch_size = int(patch_size)
        self.grids: tuple[tuple[int, int], ...] = tuple(
            (int(g[0]), int(g[1])) for g in (DEFAULT_ANYRES_GRIDS if grids is None else grids)
        )
        if anyres:
            if not self.grids:
                raise ConfigError("anyres needs at least one grid")
            for width, height in self.grids:
                if width <= 0 or height <= 0 or width % self.patch_size or height % self.patch_size:
                    raise ConfigError(
                        f"anyres grid {width}x{height} is not a positive multiple of the patch size {self.patch_size}"
                    )
        self.image_mean = _as_channel_triplet(image_mean, "image_mean")
        self.image_std = _as_channel_triplet(image_std, "image_std")
        if any(s == 0.0 for s in self.image_std):
            raise ConfigError(f"image_std must not contain 0, got {self.image_std}")
        self.anyres = bool(anyres)
        if max_image_pixels is not None and int(max_image_pixels) <= 0:
            raise ConfigError(f"max_image_pixels must be positive or None, got {max_image_pixels}")
        self.max_image_pixels = None if max_image_pixels is None else int(max_image_pixels)
        if int(tokens_per_patch) <= 0:
            raise ConfigError(f"tokens_per_patch must be positive, got {tokens_per_patch}")
        self.tokens_per_patch = int(tokens_per_patch)
        interpolation_mode = str(interpolation_mode).lower()
        if interpolation_mode not in ("bicubic", "bilinear"):
            raise ConfigError(f"interpolation_mode must be 'bicubic' or 'bilinear', got {interpolation_mode!r}")
        self.interpolation_mode = interpolation_mode
        # resize_mode only shapes the per-patch transform, a no-op on 384x384 patches in the anyres path; the base
        # path squashes, the only mode the released checkpoints use.
        if not self.anyres and resize_mode != "squash":
            raise ConfigError(f"resize_mode {resize_mode!r} is not supported (only 'squash', as in the official configs)")
        self.resize_mode = resize_mode
        self.apply_exif_orientation = bool(apply_exif_orientation)
        # Same float32 [3,1,1] tensors torchvision's Normalize builds, so the arithmetic is identical.
        self._mean = torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1)
        ensure_pil_pixel_limit_at_least(self.max_image_pixels)

    # ---- construction from the official files ----------------------------------------------------------------

    @classmethod
    def from_config_dict(
        cls,
        config: dict[str, Any],
        *,
        anyres: bool | None = None,
        default_grids: Iterable[Sequence[int]] | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        tokens_per_patch: int = DEFAULT_TOKENS_PER_PATCH,
    ) -> ImageProcessor:
        """Build from a ``preprocessor_config.json`` dict (``Blip3ImageProcessor`` keys).

        anyres is decided by ``anyres`` when given, else ``image_aspect_ratio == "anyres"`` when the key is present,
        else "grids is not null" (the base checkpoint has neither -> base path). Null grids on the anyres path fall
        back to ``default_grids`` (e.g. ``config.json``'s ``anyres_grids``), then to ``DEFAULT_ANYRES_GRIDS``.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"preprocessor config must be a JSON object, got {type(config).__name__}")
        grids = config.get("grids")
        if anyres is None:
            if "image_aspect_ratio" in config and config["image_aspect_ratio"] is not None:
                aspect = str(config["image_aspect_ratio"]).lower()
                if aspect not in ("anyres", "none"):
                    raise ConfigError(f"image_aspect_ratio {aspect!r} is not supported (expected 'anyres' or 'none')")
                anyres = aspect == "anyres"
            else:
                anyres = grids is not None
        if grids is None:
            grids = default_grids if default_grids is not None else DEFAULT_ANYRES_GRIDS
        try:
            grids = tuple((int(g[0]), int(g[1])) for g in grids)
        except (TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"grids must be a list of [width, height] pairs, got {config.get('grids')!r}") from exc

        size = config.get("size", (384, 384))
        if isinstance(size, dict):  # HF-style {"height": h, "width": w}
            size = (size.get("height"), size.get("width"))
        elif isinstance(size, (int, float)):
            size = (size, size)
        try:
            height, width = int(size[0]), int(size[1])
        except (TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"size must be [height, width], got {size!r}") from exc
        if height != width:
            raise ConfigError(f"only square patch sizes are supported, got size {list(size)}")
        if config.get("do_resize", True) is False:
            raise ConfigError("do_resize=false is not supported: the model needs fixed-size patches")
        return cls(
            grids=grids,
            patch_size=height,
            image_mean=config.get("image_mean") if config.get("image_mean") is not None else (0.5, 0.5, 0.5),
            image_std=config.get("image_std") if config.get("image_std") is not None else (0.5, 0.5, 0.5),
            anyres=anyres,
            max_image_pixels=max_image_pixels,
            tokens_per_patch=tokens_per_patch,
            interpolation_mode=config.get("interpolation_mode") or "bicubic",
            resize_mode=config.get("resize_mode") or "squash",
        )

    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: str | os.PathLike[str],
        *,
        anyres: bool | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> ImageProcessor:
        """Read ``preprocessor_config.json`` (and, if present, ``config.json`` for ``anyres_grids`` / tokens per
        patch). A missing preprocessor config means the instruct defaults (anyres over the default grids)."""
        directory = os.fspath(checkpoint_dir)
        if not os.path.isdir(directory):
            raise ConfigError(f"checkpoint directory not found: {directory}")
        model_config = _read_json_if_exists(os.path.join(directory, "config.json"))
        vision_encoder = model_config.get("vision_encoder_config") or {}
        vision_tokenizer = model_config.get("vision_tokenizer_config") or {}
        default_grids = vision_encoder.get("anyres_grids") if isinstance(vision_encoder, dict) else None
        tokens_per_patch = DEFAULT_TOKENS_PER_PATCH
        if isinstance(vision_tokenizer, dict) and vision_tokenizer.get("num_vis_tokens") is not None:
            tokens_per_patch = int(vision_tokenizer["num_vis_tokens"])
        preprocessor_path = os.path.join(directory, "preprocessor_config.json")
        if os.path.exists(preprocessor_path):
            preprocessor = _read_json_if_exists(preprocessor_path)
        else:
            preprocessor = {"image_aspect_ratio": "anyres"} if anyres is None else {}
        return cls.from_config_dict(
            preprocessor,
            anyres=anyres,
            default_grids=default_grids,
            max_image_pixels=max_image_pixels,
            tokens_per_patch=tokens_per_patch,
        )

    # ---- processing ------------------------------------------------------------------------------------------

    def __call__(self, image: Image.Image) -> ProcessedImage:
        """Anyres tiling (or the base path when this processor is not anyres)."""
        if not self.anyres:
            return self.process_base(image)
        rgb = self._prepare(image)
        size = rgb.size
        target_w, target_h = select_best_resolution(size, self.grids)
        resized_w, resized_h = _resized_size_in_grid(size, (target_w, target_h))
        p = self.patch_size
        with _pil_errors_as_image_errors():
            base = rgb.resize((p, p), Image.Resampling.BICUBIC)
            resized = rgb.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
        # Paste on a black canvas and cut row-major tiles: pure copies, done in torch.
        canvas = torch.zeros(3, target_h, target_w, dtype=torch.uint8)
        offset_x, offset_y = (target_w - resized_w) // 2, (target_h - resized_h) // 2
        canvas[:, offset_y : offset_y + resized_h, offset_x : offset_x + resized_w] = _rgb_to_uint8_chw(resized)
        grid_w, grid_h = target_w // p, target_h // p
        tiles = canvas.view(3, grid_h, p, grid_w, p).permute(1, 3, 0, 2, 4).reshape(grid_h * grid_w, 3, p, p)
        pixels_u8 = torch.cat([_rgb_to_uint8_chw(base).unsqueeze(0), tiles], dim=0)
        return ProcessedImage(
            pixel_values=self._normalize(pixels_u8),
            image_size=size,
            grid=(grid_w, grid_h),
            content_hash=image_content_hash(rgb),
            tokens_per_patch=self.tokens_per_patch,
        )

    def process_base(self, image: Image.Image) -> ProcessedImage:
        """The base-model path: one squash resize to P x P (``Resize((P,P), interpolation_mode)``), Np = 1."""
        rgb = self._prepare(image)
        resample = Image.Resampling.BILINEAR if self.interpolation_mode == "bilinear" else Image.Resampling.BICUBIC
        with _pil_errors_as_image_errors():
            squashed = rgb.resize((self.patch_size, self.patch_size), resample)
        return ProcessedImage(
            pixel_values=self._normalize(_rgb_to_uint8_chw(squashed).unsqueeze(0)),
            image_size=rgb.size,
            grid=None,
            content_hash=image_content_hash(rgb),
            tokens_per_patch=self.tokens_per_patch,
        )

    def preprocess_many(self, images: Iterable[Image.Image]) -> list[ProcessedImage]:
        return [self(image) for image in images]

    def expected_grid(self, image_size_wh: Sequence[int]) -> tuple[int, int] | None:
        """(patches wide, patches tall) an image of this (W, H) gets, without touching pixels; None on base path."""
        if not self.anyres:
            return None
        target_w, target_h = select_best_resolution(image_size_wh, self.grids)
        return target_w // self.patch_size, target_h // self.patch_size

    def expected_num_patches(self, image_size_wh: Sequence[int]) -> int:
        grid = self.expected_grid(image_size_wh)
        return 1 if grid is None else 1 + grid[0] * grid[1]

    def expected_num_vision_tokens(self, image_size_wh: Sequence[int]) -> int:
        return self.tokens_per_patch * self.expected_num_patches(image_size_wh)

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(anyres={self.anyres}, grids={list(self.grids)}, patch_size={self.patch_size}, "
            f"image_mean={self.image_mean}, image_std={self.image_std}, max_image_pixels={self.max_image_pixels})"
        )

    # ---- internals -------------------------------------------------------------------------------------------

    def _prepare(self, image: Image.Image) -> Image.Image:
        """Size check (before decoding), EXIF orientation, RGB conversion (decodes)."""
        if not isinstance(image, Image.Image):
            raise ImageError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        check_image_pixels(image.size, self.max_image_pixels)
        with _pil_errors_as_image_errors():
            oriented = _apply_exif_orientation(image) if self.apply_exif_orientation else image
            rgb = to_rgb(oriented)
            rgb.load()
        return rgb

    def _normalize(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        # torchvision: ToTensor -> to(float32).div(255); Normalize -> sub(mean).div(std) with [3,1,1] tensors.
        # In place on the fresh float32 copy: same arithmetic, fewer allocations.
        pixels = pixels_u8.to(torch.float32, memory_format=torch.contiguous_format)
        return pixels.div_(255).sub_(self._mean).div_(self._std)


def _read_json_if_exists(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a JSON object")
    return data


class _pil_errors_as_image_errors:
    """Turn Pillow's decode failures (truncated data, bad mode, decompression bomb) into typed ``ImageError``s."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, ImageError):
            return False
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageTooLargeError(f"image too large: {exc}") from exc
        if isinstance(exc, (OSError, ValueError, SyntaxError, EOFError, struct.error)):
            raise ImageError(f"cannot decode image: {exc}") from exc
        return False

