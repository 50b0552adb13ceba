"""Fixtures of the LlamaIndex adapter tests: one shared tiny random checkpoint (from tests/conftest.py), one engine,
a few small PNGs on disk and a loopback HTTP server that serves them (tests never reach the network)."""

from __future__ import annotations

import http.server
import io
import threading
from pathlib import Path

import pytest
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def png_bytes(color=(220, 30, 30), size=(48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def model_path(tiny_checkpoint) -> str:
    return str(tiny_checkpoint)


@pytest.fixture(scope="session")
def llm(model_path):
    from llama_index.llms.xgenmm import XGenMM

    return XGenMM(model=model_path, device="cpu", dtype="float32", max_tokens=4)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("li-images")
    for name, color in COLORS.items():
        (folder / f"{name}.png").write_bytes(png_bytes(color))
    return folder


@pytest.fixture(scope="session")
def png(image_dir) -> bytes:
    return (image_dir / "red.png").read_bytes()


@pytest.fixture(scope="session")
def image_server(image_dir):
    """http://127.0.0.1:<port>/<name>.png from image_dir, on a loopback thread."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(image_dir), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
