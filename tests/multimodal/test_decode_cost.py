"""The image budget counts decode memory from the header: every 8-bit mode within the pixel limit passes, a 16-bit
image of the same size does not (it costs more bytes a pixel on its way to RGB), before any pixel is decoded."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.server.hostile_values import big_png
from xgenmm.errors import ImageTooLargeError
from xgenmm.multimodal.decode_cost import BUDGET_BYTES_PER_PIXEL, bytes_per_pixel
from xgenmm.multimodal.image_sources import ImageInputPolicy, load_image

SIDE = 1000
POLICY = ImageInputPolicy(max_image_pixels=SIDE * SIDE)


@pytest.mark.parametrize("color_type", [0, 2, 6], ids=["gray8", "rgb8", "rgba8"])
def test_eight_bit_images_at_the_pixel_limit_pass(color_type):
    image = load_image(big_png(SIDE, SIDE, 8, color_type), POLICY, decode=False)
    assert image.size == (SIDE, SIDE)
    assert bytes_per_pixel(image.mode) <= BUDGET_BYTES_PER_PIXEL


def test_sixteen_bit_image_at_the_pixel_limit_is_refused_from_its_header():
    data = big_png(SIDE, SIDE, 16, 0)
    header = Image.open(io.BytesIO(data))
    assert header.mode == "I;16"
    with pytest.raises(ImageTooLargeError, match="to decode"):
        load_image(data, POLICY, decode=False)
    small = big_png(SIDE // 2, SIDE // 2, 16, 0)  # a quarter of the pixels: within the byte budget
    assert load_image(small, POLICY).size == (SIDE // 2, SIDE // 2)
