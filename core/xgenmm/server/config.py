"""`ServerConfig`: everything `xgenmm serve` can be told, with safe defaults (loopback, no remote images, requests
only from this machine's own Host names, no CORS, budgets checked before work). docs/cli_and_server.md has the
security model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint.hub import DEFAULT_MODEL_ID
from ..errors import ConfigError
from ..multimodal.image_sources import DEFAULT_MAX_IMAGE_BYTES, ImageInputPolicy

API_KEY_ENV = "XGENMM_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


# What an HTTP client can do about a refused image: it can never make the server read the server's own files.
SERVER_ENABLE_HINTS = {
    "allow_local_files": "a server never reads files of its own machine: send the image inline as a data: URL "
                         "(data:image/png;base64,...)",
    "allow_remote_images": "send the image inline as a data: URL, or ask the operator to start the server with "
                           "xgenmm serve --allow-remote-images",
    "allow_private_addresses": "send the image inline as a data: URL (the server never fetches from private "
                               "addresses)",
}

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
    max_image_pixels: int = 36_000_000  # one image (6000x6000), from its header, before decoding
    max_request_image_pixels: int = 72_000_000  # all images of one request together
    max_tokens_default: int | None = None  # when a request sets neither max_tokens nor max_completion_tokens
    max_tokens_ceiling: int = 131_072  # above: 400; up to it, max_tokens is clamped to what the context leaves
    max_n: int = 16  # choices per request
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback and the bound address ("*": any)
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed (CORS); none by default ("*": any)
    metrics_require_api_key: bool = True  # when an API key is set, /metrics needs it too
    insecure_no_api_key: bool = False  # allow a non-loopback host without an API key
    disconnect_poll_s: float = 0.25  # how often a non-streaming request checks that its client is still there
    # Slow clients (server/connections.py): seconds to complete a request's headers (from connect, or from the next
    # request's first byte), to send each body chunk, to send the whole body; idle keep-alive; open connections.
    header_timeout_s: float = 10.0
    body_chunk_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 256
    engine_options: dict[str, Any] = field(default_factory=dict)  # passed to AsyncLLM (kv cache size, ...)
    log_level: str = "info"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def resolved_api_key(self) -> str | None:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return key or None

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def accepted_hosts(self) -> frozenset[str] | None:
        """Host header names (without port) requests may carry, or None for any. Loopback servers refuse every
        other name (a web page that rebinds a DNS name to 127.0.0.1 sends that name, so it is refused); a server on
        another address accepts any name unless `allowed_hosts` lists them (it needs an API key instead)."""
        extra = {h.lower().strip("[]") for h in self.allowed_hosts}
        if "*" in extra or (not self.is_loopback and not extra):
            return None
        names = {h.strip("[]") for h in LOOPBACK_HOSTS} | extra
        if self.host not in ("0.0.0.0", "::"):
            names.add(self.host.lower().strip("[]"))
        return frozenset(names)

    def validate(self) -> None:
        """Refuse settings that would expose the model to anyone: a non-loopback address without an API key."""
        if not self.is_loopback and not self.resolved_api_key() and not self.insecure_no_api_key:
            raise ConfigError(f"refusing to serve on {self.host} without an API key: anyone who can reach it could "
                              f"use it. Set --api-key (or ${API_KEY_ENV}), or pass --insecure-no-api-key")
        for name in ("max_n", "max_tokens_ceiling", "max_image_pixels", "max_request_image_pixels",
                     "max_images_per_request", "max_request_bytes", "max_image_bytes", "header_timeout_s",
                     "body_chunk_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "max_connections"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def image_policy(self) -> ImageInputPolicy:
        """Requests may carry data URLs; remote URLs only when enabled; never files of the server's machine."""
        policy = ImageInputPolicy(allow_remote_images=self.allow_remote_images, allow_local_files=False,
                                  max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                                  max_request_image_pixels=self.max_request_image_pixels)
        return policy.with_hints(SERVER_ENABLE_HINTS)
