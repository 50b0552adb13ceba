"""What decoding an image costs in memory, known from its header (mode and size), before any pixel is decoded.

Pixels alone undercount: Pillow stores an RGB pixel in 4 bytes, and a 16-bit image goes through wider buffers on
its way to RGB. The cost of one pixel is its decoded storage plus the intermediates `to_rgb` creates. The byte
budget of an image is what the pixel limit costs in the most expensive 8-bit mode (`BUDGET_BYTES_PER_PIXEL`): every
8-bit image within the pixel limit passes as before, a 16-bit one gets proportionally fewer pixels.
"""

from __future__ import annotations

from PIL import Image

from ..errors import ImageTooLargeError

__all__ = ["BUDGET_BYTES_PER_PIXEL", "bytes_per_pixel", "check_decoded_bytes", "decoded_bytes"]

# Pillow's storage: 1 byte a pixel for these modes, 2 for 16-bit ones, 4 for all others (RGB included).
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_RGB_BYTES = 4
BUDGET_BYTES_PER_PIXEL = 8  # RGBA / CMYK / LA...: 4 decoded + 4 for the RGB copy


def bytes_per_pixel(mode: str) -> int:
    """Peak bytes per pixel to decode an image of `mode` and convert it to RGB (see image_processing.to_rgb)."""
    if mode == "RGB":
        return _RGB_BYTES
    if mode in _ONE_BYTE_MODES:
        return 1 + _RGB_BYTES
    if mode in _SIXTEEN_BIT_MODES:
        return 2 + 4 + 1 + _RGB_BYTES  # decoded, the 32-bit rescale, the 8-bit gray, RGB
    return 4 + _RGB_BYTES


def decoded_bytes(image: Image.Image) -> int:
    width, height = image.size
    return width * height * bytes_per_pixel(image.mode)


def check_decoded_bytes(image: Image.Image, max_pixels: int | None, what: str = "image") -> int:
    """The image's decode cost; `ImageTooLargeError` when it exceeds what `max_pixels` allows (None: unlimited)."""
    cost = decoded_bytes(image)
    if max_pixels is not None and cost > max_pixels * BUDGET_BYTES_PER_PIXEL:
        width, height = image.size
        raise ImageTooLargeError(
            f"{what}: a {width}x{height} {image.mode} image needs about {cost // 2**20} MiB to decode; the limit is "
            f"{max_pixels * BUDGET_BYTES_PER_PIXEL // 2**20} MiB (max_image_pixels x {BUDGET_BYTES_PER_PIXEL} bytes; "
            f"16-bit images cost {bytes_per_pixel('I;16')} bytes a pixel)")
    return cost
