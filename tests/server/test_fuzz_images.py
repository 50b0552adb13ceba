"""Image fuzz: valid images of every format the installed Pillow writes (animated GIF / WebP / PNG and AVIF where
available), mutated (bytes flipped, overwritten, cut, repeated; TIFF tags retyped), go through the engine's real
input path (open under the policy, budgets from the header, decode, tile). The only outcomes allowed: a typed
`ImageError` (a 400 at the server) or a tiled image; unmutated lossless images decode to their own pixels.

`XGENMM_IMAGE_FUZZ_EXAMPLES` sets the number of mutated cases (default 150).
"""

from __future__ import annotations

import io
import os
import struct

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from tests.server.hostile_values import data_url
from tests.server.support import MODEL_NAME
from xgenmm.errors import ImageError
from xgenmm.multimodal.image_processing import ProcessedImage, to_rgb
from xgenmm.multimodal.image_sources import SAFE_IMAGE_FORMATS, ImageInputPolicy

EXAMPLES = int(os.environ.get("XGENMM_IMAGE_FUZZ_EXAMPLES", "150"))
POLICY = ImageInputPolicy(max_image_pixels=4_000_000, max_request_image_pixels=4_000_000)
LOSSLESS = {"PNG", "BMP", "TIFF", "GIF", "PPM", "TGA", "QOI", "DIB", "SGI", "PCX", "IM", "MSP", "XBM"}
OUTCOMES: dict[str, int] = {"refused": 0, "tiled": 0}


def _source(mode: str = "RGB", size=(40, 30)) -> Image.Image:
    ramp = np.add.outer(np.arange(size[1]) * 5, np.arange(size[0]) * 3).astype(np.uint8)
    rgb = Image.fromarray(np.stack([ramp, 255 - ramp, ramp // 2], axis=-1), "RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


def _encode(fmt: str) -> tuple[bytes, Image.Image] | None:
    for mode in ("RGB", "L", "1"):
        image = _source(mode)
        buf = io.BytesIO()
        try:
            image.save(buf, format=fmt)
        except Exception:
            continue
        return buf.getvalue(), image
    return None


def _animated(fmt: str) -> bytes | None:
    frames = [_source().rotate(angle) for angle in (0, 90, 180)]
    buf = io.BytesIO()
    try:
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    except Exception:
        return None
    return buf.getvalue()


def _samples() -> dict[str, bytes]:
    Image.init()
    samples = {}
    for fmt in sorted(Image.SAVE):
        encoded = _encode(fmt)
        if encoded is not None:
            samples[fmt] = encoded[0]
    for fmt in ("GIF", "WEBP", "PNG"):
        animated = _animated(fmt)
        if animated is not None:
            samples[f"animated-{fmt}"] = animated
    samples["PNG-16bit"] = _png16()
    return samples


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50)).save(buf, format="PNG")
    return buf.getvalue()


SAMPLES = _samples()


def _run(processor, data: bytes) -> str:
    """The engine's input path for one image; returns "refused" (typed ImageError) or "tiled"."""
    try:
        opened = processor.load_images([data], POLICY, "fuzz")
        images = processor.decode_images(opened, "fuzz", tile=True)
    except ImageError:
        return "refused"
    assert isinstance(images[0], ProcessedImage)
    return "tiled"


@pytest.fixture(scope="module")
def processor(server_llm):
    yield server_llm.handle.inputs
    print(f"image fuzz: {sum(OUTCOMES.values())} mutated cases, {OUTCOMES}")


def test_every_writable_format_was_sampled():
    assert {"PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"} <= set(SAMPLES)
    if features.check("avif"):
        assert "AVIF" in SAMPLES


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_unmutated_images_tile_or_are_refused_by_format(processor, fmt):
    outcome = _run(processor, SAMPLES[fmt])
    base = fmt.split("-")[-1] if fmt.startswith("animated-") else fmt.split("-")[0]
    if base in SAFE_IMAGE_FORMATS and base != "DIB":
        assert outcome == "tiled", fmt
    else:
        assert outcome in ("refused", "tiled"), fmt  # formats we do not open (EPS, PDF, ...) are refused


@pytest.mark.parametrize("fmt", sorted(f for f in SAMPLES if f in LOSSLESS and f in SAFE_IMAGE_FORMATS))
def test_lossless_images_decode_to_their_own_pixels(fmt):
    from xgenmm.multimodal.image_sources import load_image

    encoded = _encode(fmt)
    assert encoded is not None
    data, source = encoded
    decoded = to_rgb(load_image(data, POLICY))
    assert np.array_equal(np.asarray(decoded), np.asarray(source.convert("RGB"))), fmt


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("overwrite"), st.integers(0, 96), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(b"")),
    st.tuples(st.just("repeat"), st.integers(0, 10**6), st.integers(1, 64)),
)


def _mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for kind, where, arg in ops:
        if not out:
            break
        at = where % len(out)
        if kind == "flip":
            out[at] ^= arg
        elif kind == "overwrite":
            out[at:at + len(arg)] = arg
        elif kind == "truncate":
            del out[max(at, 1):]
        else:
            out[at:at] = out[at:at + arg]
    return bytes(out)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(SAMPLES)), ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_images_are_typed_errors_or_tiled(processor, fmt, ops):
    OUTCOMES[_run(processor, _mutate(SAMPLES[fmt], ops))] += 1


def _retyped_tiffs() -> list[bytes]:
    """The sample TIFF with each IFD entry's type replaced by every TIFF type (the review's TypeError class)."""
    data = SAMPLES["TIFF"]
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    count = struct.unpack_from("<H", data, ifd)[0]
    out = []
    for entry in range(count):
        at = ifd + 2 + 12 * entry + 2
        for kind in (0, 2, 5, 7, 11, 13, 16):
            mutated = bytearray(data)
            struct.pack_into("<H", mutated, at, kind)
            out.append(bytes(mutated))
    return out


def test_retyped_tiff_tags_are_typed_errors_or_tiled(processor):
    outcomes = [_run(processor, data) for data in _retyped_tiffs()]
    assert "refused" in outcomes  # some retypings make the file unreadable: refused, not a 500


def test_mutated_images_through_the_server_are_400_or_answers(server):
    """A few mutations end to end: 200 with an answer, or 400 naming `messages` with an image error code."""
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        for i, fmt in enumerate(("PNG", "TIFF", "GIF", "animated-GIF", "WEBP", "JPEG")):
            data = _mutate(SAMPLES[fmt], [("flip", 40 + 7 * i, 0x5A), ("truncate", len(SAMPLES[fmt]) * 3 // 4, b"")])
            reply = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 2, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}},
                                             {"type": "text", "text": "What is it?"}]}]})
            assert reply.status_code in (200, 400), (fmt, reply.text[:300])
            if reply.status_code == 400:
                error = reply.json()["error"]
                assert error["param"] == "messages" and error["code"] in ("invalid_image", "image_too_large"), error
            else:
                assert reply.json()["usage"]["completion_tokens"] >= 1
