"""Helpers for the LangChain adapter tests (a uniquely named module: tests/ has no packages)."""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The one remote image the standard suite uses (test_image_inputs / test_image_tool_message / test_anthropic_inputs).
STANDARD_IMAGE_URL = (
    "https://raw.githubusercontent.com/langchain-ai/docs/4d11d08b6b0e210bd456943f7a22febbd168b543/"
    "src/images/agentic-rag-output.png"
)


@functools.lru_cache(maxsize=1)
def tiny_model_path() -> str:
    """A tiny random xGen-MM checkpoint (official format + tokenizer), built once per test process.

    A function rather than a fixture because the langchain-tests classes read it from properties."""
    from xgenmm.testing import make_random_checkpoint

    root = tempfile.mkdtemp(prefix="xgenmm-lc-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return str(make_random_checkpoint(Path(root) / "tiny", preset="tiny", seed=0))


def model_params(**overrides) -> dict:
    params = {"model": tiny_model_path(), "device": "cpu", "dtype": "float32"}
    params.update(overrides)
    return params


@functools.lru_cache(maxsize=1)
def local_png() -> bytes:
    """A small PNG with some structure (stands in for the standard suite's downloaded picture)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 200), (240, 240, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 140, 120), fill=(200, 40, 40))
    draw.ellipse((170, 40, 300, 170), fill=(40, 90, 200))
    draw.text((30, 150), "xgenmm", fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(color=(200, 40, 40), size=(48, 32)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class LoopbackImageServer:
    """A tiny HTTP server on 127.0.0.1 serving one PNG at /img.png (for URL-policy tests; never a remote host)."""

    def __init__(self, body: bytes) -> None:
        import http.server
        import threading

        payload = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/img.png"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
