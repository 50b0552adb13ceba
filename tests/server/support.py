"""Constants and helpers shared by the server tests (imported by name: tests/server is on sys.path)."""

from __future__ import annotations

from xgenmm.server import ServerConfig

MODEL_NAME = "xgenmm-tiny"
MAX_IMAGES = 2


def make_config(checkpoint, **overrides) -> ServerConfig:
    options = dict(model=str(checkpoint), served_model_name=MODEL_NAME, device="cpu", dtype="float32", port=0,
                   api_key="", max_images_per_request=MAX_IMAGES, max_request_bytes=2 * 1024**2)
    options.update(overrides)
    return ServerConfig(**options)
