"""`ServerConfig`: everything `xgenmm serve` can be told, with safe defaults (loopback, no remote images)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import DEFAULT_MODEL_ID
from ..multimodal.image_sources import DEFAULT_MAX_IMAGE_BYTES, ImageInputPolicy

API_KEY_ENV = "XGENMM_API_KEY"


@dataclass
class ServerConfig:
    model: str = DEFAULT_MODEL_ID
    device: str | None = None
    dtype: str | None = None
    served_model_name: str | None = None  # the name clients put in "model" (default: `model` as given)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: read XGENMM_API_KEY; "" disables auth even when the variable is set
    allow_remote_images: bool = False  # fetch http(s) image URLs (SSRF-guarded); data: URLs are always accepted
    max_request_bytes: int = 32 * 1024 * 1024
    max_images_per_request: int = 8
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_tokens_default: int | None = None  # when a request sets neither max_tokens nor max_completion_tokens
    disconnect_poll_s: float = 0.25  # how often a non-streaming request checks that its client is still there
    engine_options: dict[str, Any] = field(default_factory=dict)  # passed to AsyncLLM (kv cache size, ...)
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def resolved_api_key(self) -> str | None:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return key or None

    def image_policy(self) -> ImageInputPolicy:
        """Requests may carry data URLs; remote URLs only when enabled; never files of the server's machine."""
        return ImageInputPolicy(allow_remote_images=self.allow_remote_images, allow_local_files=False,
                                max_image_bytes=self.max_image_bytes)
