"""Anyres preprocessing: bit-exact against the official fixture tensors, plus the input-normalisation edge cases."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.support import XGENMM_TINY
from xgenmm.errors import ConfigError, ImageError, ImageTooLargeError
from xgenmm.multimodal.image_processing import (
    DEFAULT_ANYRES_GRIDS,
    ImageProcessor,
    ProcessedImage,
    image_content_hash,
    select_best_resolution,
    to_rgb,
)

FIXTURES = XGENMM_TINY
CHECKPOINT = FIXTURES / "checkpoint"


def _fixture_image_facts() -> dict[str, dict]:
    """image file name -> {size, grid, num_patches, num_vision_tokens} from cases.json."""
    cases = json.loads((FIXTURES / "cases.json").read_text())
    facts: dict[str, dict] = {}
    for case in cases["cases"]:
        for sample in case["samples"]:
            for i, image in enumerate(sample.get("images") or []):
                facts[Path(image).name] = {
                    "size": tuple(sample["image_sizes_wh"][i]),
                    "grid": tuple(sample["anyres_grid_wh"][i]),
                    "num_patches": sample["num_patches"][i],
                    "num_vision_tokens": sample["num_vision_tokens"][i],
                }
    return facts


FACTS = _fixture_image_facts()


@pytest.fixture(scope="module")
def processor() -> ImageProcessor:
    return ImageProcessor.from_pretrained(CHECKPOINT)


def _normalize_like_upstream(u8: torch.Tensor) -> torch.Tensor:
    return (u8.float() / 255 - 0.5) / 0.5


def _png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save_kwargs)
    return buffer.getvalue()


def _pattern_image(width: int, height: int, seed: int = 0) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.frombytes("RGB", (width, height), pixels.numpy().tobytes())


# ---- golden fixtures --------------------------------------------------------------------------------------------


def test_fixture_facts_cover_all_six_images():
    assert sorted(FACTS) == sorted(p.name for p in (FIXTURES / "images").glob("*.png"))
    assert len(FACTS) == 6


@pytest.mark.parametrize("name", sorted(FACTS))
def test_pixels_bit_exact_with_official_fixture(processor: ImageProcessor, name: str):
    facts = FACTS[name]
    out = processor(Image.open(FIXTURES / "images" / name))
    expected_u8 = load_file(str(FIXTURES / "expected" / "images" / name.replace(".png", ".safetensors")))[
        "pixel_values_u8"
    ]
    assert isinstance(out, ProcessedImage)
    assert out.pixel_values.dtype == torch.float32
    assert out.pixel_values.shape == expected_u8.shape
    assert torch.equal(out.pixel_values, _normalize_like_upstream(expected_u8))
    assert out.grid == facts["grid"]
    assert out.image_size == facts["size"]
    assert out.num_patches == facts["num_patches"]
    assert out.num_vision_tokens == facts["num_vision_tokens"]
    assert processor.expected_grid(out.image_size) == out.grid
    assert processor.expected_num_vision_tokens(out.image_size) == out.num_vision_tokens


def test_from_pretrained_reads_official_config(processor: ImageProcessor):
    assert processor.anyres is True
    assert processor.grids == DEFAULT_ANYRES_GRIDS
    assert processor.patch_size == 384
    assert processor.image_mean == (0.5, 0.5, 0.5) and processor.image_std == (0.5, 0.5, 0.5)
    assert processor.tokens_per_patch == 128


# ---- select_best_resolution -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, expected",
    [
        ((640, 480), (768, 768)),
        ((300, 900), (384, 1152)),
        ((1200, 350), (1152, 384)),
        ((2000, 1000), (768, 384)),
        ((350, 640), (384, 768)),
        # Fits inside every grid: all tie on effective resolution, the first minimal-waste grid (tall 1x2) wins.
        ((97, 61), (384, 768)),
        ((1, 1), (384, 768)),
        ((384, 384), (384, 768)),
        ((1000, 10), (1152, 384)),
        ((10, 1000), (384, 1152)),
    ],
)
def test_select_best_resolution_default_grids(size, expected):
    assert select_best_resolution(size, DEFAULT_ANYRES_GRIDS) == expected


def test_select_best_resolution_exact_tie_keeps_first():
    # 97x61 fits both with the same effective resolution and the same waste: the earlier candidate wins.
    assert select_best_resolution((97, 61), [(768, 384), (384, 768)]) == (768, 384)
    assert select_best_resolution((97, 61), [(384, 768), (768, 384)]) == (384, 768)


def test_select_best_resolution_tie_on_effective_goes_to_smaller_waste():
    # 384x384 keeps all its pixels in both; (384,768) wastes less although it comes second.
    assert select_best_resolution((384, 384), [(768, 768), (384, 768)]) == (384, 768)


def test_select_best_resolution_prefers_more_effective_pixels_over_less_waste():
    # 2000x1000 keeps 768x384 px in both 768x768 and 768x384 (s = 0.384): equal, so the smaller waste wins.
    assert select_best_resolution((2000, 1000), [(768, 768), (768, 384)]) == (768, 384)
    # 1200x350 keeps 1152x336 px in 1152x384 but only 768x224 in 768x384: more pixels beat less waste.
    assert select_best_resolution((1200, 350), [(768, 384), (1152, 384)]) == (1152, 384)


def test_select_best_resolution_rejects_empty_size():
    with pytest.raises(ImageError):
        select_best_resolution((0, 10), DEFAULT_ANYRES_GRIDS)


# ---- EXIF orientation ---------------------------------------------------------------------------------------------


def _exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("container", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(processor: ImageProcessor, container: str):
    stored = _pattern_image(60, 20, seed=1)  # landscape as stored; orientation 6 = display rotated 90 deg clockwise
    buffer = io.BytesIO()
    stored.save(buffer, container, exif=_exif_with_orientation(6), **({"quality": 95} if container == "JPEG" else {}))
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    rotated = decoded.transpose(Image.Transpose.ROTATE_270)  # what a viewer shows
    upright = Image.frombytes("RGB", rotated.size, rotated.tobytes())  # same pixels, no EXIF tag left
    out = processor(opened)
    reference = processor(upright)
    assert out.image_size == (20, 60)
    assert out.grid == (1, 2)  # portrait grid, not the landscape one the stored pixels would get
    assert torch.equal(out.pixel_values, reference.pixel_values)
    assert out.content_hash == reference.content_hash


def test_exif_orientation_can_be_disabled():
    stored = _pattern_image(60, 20, seed=2)
    opened = Image.open(io.BytesIO(_png_bytes(stored, exif=_exif_with_orientation(6))))
    out = ImageProcessor(apply_exif_orientation=False)(opened)
    assert out.image_size == (60, 20)


# ---- modes ------------------------------------------------------------------------------------------------------


def _mode_images() -> dict[str, Image.Image]:
    rgb = _pattern_image(50, 30, seed=3)
    rgba = rgb.convert("RGBA")
    alpha = Image.linear_gradient("L").resize((50, 30))
    rgba.putalpha(alpha)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_trns = palette.copy()
    palette_trns.info["transparency"] = bytes([0, 128] + [255] * 14)
    return {
        "L": rgb.convert("L"),
        "LA": rgba.convert("LA"),
        "RGBA": rgba,
        "P": palette,
        "P+transparency": palette_trns,
        "CMYK": rgb.convert("CMYK"),
        "1": rgb.convert("1"),
        "YCbCr": rgb.convert("YCbCr"),
    }


@pytest.mark.parametrize("mode_name", sorted(_mode_images()))
def test_modes_match_convert_rgb(processor: ImageProcessor, mode_name: str):
    image = _mode_images()[mode_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        upstream_rgb = image.convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our conversion must not warn (P with bytes transparency does in Pillow)
        ours = to_rgb(image)
        out = processor(image)
    assert ours.mode == "RGB"
    assert ours.tobytes() == upstream_rgb.tobytes()
    assert torch.equal(out.pixel_values, processor(upstream_rgb).pixel_values)


def test_alpha_is_dropped_not_composited():
    rgba = Image.new("RGBA", (4, 4), (200, 10, 10, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (200, 10, 10)
    la = Image.new("LA", (4, 4), (77, 0))
    assert to_rgb(la).getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_is_rescaled_not_clipped(mode: str):
    image = Image.new(mode, (4, 1))
    for x, value in enumerate([0, 257, 32768, 65535]):
        image.putpixel((x, 0), value)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert [rgb.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_sixteen_bit_png_round_trip(processor: ImageProcessor):
    ramp = torch.arange(0, 64 * 32, dtype=torch.int32).mul(32).view(32, 64)  # 0..65504
    image = Image.frombytes("I", (64, 32), ramp.numpy().tobytes(), "raw", "I").convert("I;16")
    reopened = Image.open(io.BytesIO(_png_bytes(image)))
    assert reopened.mode == "I;16"
    out = processor(reopened)
    assert out.grid == (1, 2)  # small images all get the tall 1x2 grid
    base = out.pixel_values[0]
    assert base.min().item() < -0.9 and base.max().item() > 0.9  # full range, not clipped to white


def test_one_by_one_image(processor: ImageProcessor):
    out = processor(Image.new("RGB", (1, 1), (255, 0, 0)))
    assert out.image_size == (1, 1)
    assert out.grid == (1, 2)
    assert out.num_patches == 3 and out.num_vision_tokens == 384
    base = out.pixel_values[0]
    assert torch.equal(base[0], torch.ones(384, 384)) and torch.equal(base[1], -torch.ones(384, 384))
    # Grid canvas: the single pixel upscaled to 384x384 fills the centre rows; the rest is black padding (-1).
    tiles = torch.cat([out.pixel_values[1], out.pixel_values[2]], dim=1)  # [3, 768, 384]
    assert torch.equal(tiles[0, 192:576], torch.ones(384, 384))
    assert torch.equal(tiles[:, :192], -torch.ones(3, 192, 384))


# ---- limits and errors ------------------------------------------------------------------------------------------


def _png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00" * 16)


def test_pixel_limit():
    small = ImageProcessor(max_image_pixels=110)
    assert small(Image.new("RGB", (11, 10))).num_patches == 3
    with pytest.raises(ImageTooLargeError, match=r"12x10"):
        small(Image.new("RGB", (12, 10)))


def test_pixel_limit_is_checked_before_decoding():
    lazily_opened = Image.open(io.BytesIO(_png_header_claiming(9000, 9000)))  # 81 Mpx, no real pixel data
    with pytest.raises(ImageTooLargeError, match=r"9000x9000"):
        ImageProcessor()(lazily_opened)  # default limit 64 MiP; decoding would fail differently (and slowly)


def test_pixel_limit_none_means_unlimited(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    assert ImageProcessor(max_image_pixels=None)(Image.new("RGB", (5, 5))).num_patches == 3


def test_processor_raises_pil_limit_to_its_own(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ImageProcessor(max_image_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == 5000
    ImageProcessor(max_image_pixels=100)  # never lowers it
    assert Image.MAX_IMAGE_PIXELS == 5000


def test_truncated_image_raises_image_error(processor: ImageProcessor):
    data = _png_bytes(_pattern_image(200, 100, seed=4))
    with pytest.raises(ImageError, match="decode"):
        processor(Image.open(io.BytesIO(data[: len(data) // 2])))


def test_non_image_input_raises_image_error(processor: ImageProcessor):
    with pytest.raises(ImageError, match="PIL"):
        processor(b"\x89PNG")  # type: ignore[arg-type]


# ---- content hash -----------------------------------------------------------------------------------------------


def test_content_hash_same_pixels_any_container(processor: ImageProcessor):
    image = _pattern_image(40, 30, seed=5)
    as_png = Image.open(io.BytesIO(_png_bytes(image)))
    buffer = io.BytesIO()
    image.save(buffer, "BMP")
    as_bmp = Image.open(io.BytesIO(buffer.getvalue()))
    assert as_png.format == "PNG" and as_bmp.format == "BMP"
    h_png, h_bmp = processor(as_png).content_hash, processor(as_bmp).content_hash
    assert h_png == h_bmp == image_content_hash(image)
    assert len(h_png) == 64 and int(h_png, 16) >= 0
    assert processor(image.convert("RGBA")).content_hash == h_png  # alpha dropped -> same RGB pixels


def test_content_hash_differs_for_different_pixels_or_shape(processor: ImageProcessor):
    image = _pattern_image(40, 30, seed=6)
    changed = image.copy()
    r, g, b = changed.getpixel((7, 7))
    changed.putpixel((7, 7), ((r + 1) % 256, g, b))
    assert processor(image).content_hash != processor(changed).content_hash
    same_bytes_other_shape = Image.frombytes("RGB", (30, 40), image.tobytes())
    assert image_content_hash(image) != image_content_hash(same_bytes_other_shape)


# ---- config handling and the base path ------------------------------------------------------------------------


def test_base_model_config_selects_base_path():
    base_config = {  # the official base checkpoint's preprocessor_config.json
        "do_resize": True,
        "grids": None,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Blip3ImageProcessor",
        "interpolation_mode": "bicubic",
        "resize_mode": "squash",
        "size": [384, 384],
    }
    proc = ImageProcessor.from_config_dict(base_config)
    assert proc.anyres is False
    image = _pattern_image(300, 100, seed=7)
    out = proc(image)
    assert out.grid is None and out.num_patches == 1 and out.num_vision_tokens == 128
    expected_u8 = torch.frombuffer(bytearray(image.resize((384, 384), Image.Resampling.BICUBIC).tobytes()), dtype=torch.uint8)
    expected = _normalize_like_upstream(expected_u8.view(384, 384, 3).permute(2, 0, 1)).unsqueeze(0)
    assert torch.equal(out.pixel_values, expected)
    assert torch.equal(ImageProcessor().process_base(image).pixel_values, expected)
    assert out.content_hash == image_content_hash(image)
    assert proc.expected_num_patches((300, 100)) == 1


def test_anyres_with_null_grids_uses_default_grids():
    proc = ImageProcessor.from_config_dict({"grids": None, "image_aspect_ratio": "anyres", "size": [384, 384]})
    assert proc.anyres and proc.grids == DEFAULT_ANYRES_GRIDS
    override = ImageProcessor.from_config_dict({"grids": None}, anyres=True)
    assert override.anyres and override.grids == DEFAULT_ANYRES_GRIDS
    forced_base = ImageProcessor.from_config_dict({"grids": [[384, 768]]}, anyres=False)
    assert forced_base.anyres is False


def test_from_pretrained_without_preprocessor_config_defaults_to_anyres(tmp_path: Path):
    proc = ImageProcessor.from_pretrained(tmp_path)
    assert proc.anyres and proc.grids == DEFAULT_ANYRES_GRIDS


@pytest.mark.parametrize(
    "config",
    [
        {"grids": [[384, 700]], "image_aspect_ratio": "anyres"},
        {"grids": [[384, 768]], "size": [384, 256]},
        {"image_aspect_ratio": "pad"},
        {"image_mean": [0.5, 0.5]},
        {"image_std": [0.5, 0.0, 0.5]},
        {"interpolation_mode": "lanczos", "grids": [[384, 768]]},
        {"resize_mode": "longest"},
    ],
)
def test_invalid_configs_raise_config_error(config: dict):
    with pytest.raises(ConfigError):
        ImageProcessor.from_config_dict(config)


def test_custom_mean_std_follow_torchvision_arithmetic():
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    proc = ImageProcessor(image_mean=mean, image_std=std)
    image = _pattern_image(100, 80, seed=8)
    out = proc(image)
    base_u8 = torch.frombuffer(bytearray(image.resize((384, 384), Image.Resampling.BICUBIC).tobytes()), dtype=torch.uint8)
    base = base_u8.view(384, 384, 3).permute(2, 0, 1).float().div(255)
    expected = base.sub(torch.tensor(mean).view(3, 1, 1)).div(torch.tensor(std).view(3, 1, 1))
    assert torch.equal(out.pixel_values[0], expected)


def test_preprocess_many_keeps_order(processor: ImageProcessor):
    images = [Image.new("RGB", (640, 480)), Image.new("RGB", (300, 900)), Image.new("RGB", (97, 61))]
    outs = processor.preprocess_many(images)
    assert [o.grid for o in outs] == [(2, 2), (1, 3), (1, 2)]


def test_processed_image_is_frozen(processor: ImageProcessor):
    out = processor(Image.new("RGB", (10, 10)))
    with pytest.raises(AttributeError):
        out.grid = (2, 2)  # type: ignore[misc]
