"""One tiny-checkpoint engine and one server on loopback for the whole tests/server directory."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.server.support import make_config
from xgenmm import AsyncLLM
from xgenmm.client import open_engine
from xgenmm.server import BackgroundServer


@pytest.fixture(scope="session")
def server_llm(tiny_checkpoint):
    """A private engine (small KV cache) shared by every server in this directory."""
    handle = open_engine("native", str(tiny_checkpoint), "cpu", "float32", kv_cache_memory_bytes=64 * 1024**2, shared=False)
    yield AsyncLLM.from_handle(handle)
    handle.shutdown()


@pytest.fixture(scope="session")
def server(tiny_checkpoint, server_llm):
    with BackgroundServer(make_config(tiny_checkpoint), llm=server_llm) as srv:
        yield srv


@pytest.fixture(scope="session")
def image_data_url() -> str:
    img = Image.new("RGB", (64, 48), (30, 140, 220))
    for x in range(20, 44):
        for y in range(10, 38):
            img.putpixel((x, y), (250, 200, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
