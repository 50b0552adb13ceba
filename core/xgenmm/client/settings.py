"""The options that belong to the client side of an engine (how requests are read), split from the core's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..multimodal.image_sources import ImageInputPolicy

__all__ = ["CLIENT_OPTIONS", "ClientSettings"]


@dataclass(frozen=True)
class ClientSettings:
    """`image_policy`: the default `ImageInputPolicy` (a request's own policy wins); `max_concurrent_image_decodes`:
    image pixels decoded at once per engine (bounds decode memory); `chat_content_tokens`: control tokens inside chat
    message content are "text" (nobody can forge a turn) or "special" (parsed, as upstream; see
    `xgenmm.chat.template`)."""

    image_policy: ImageInputPolicy = field(default_factory=ImageInputPolicy)
    max_concurrent_image_decodes: int = 2
    chat_content_tokens: str = "text"

    def __post_init__(self) -> None:
        if not isinstance(self.image_policy, ImageInputPolicy):
            raise ConfigError(f"image_policy must be an ImageInputPolicy, got {type(self.image_policy).__name__}")
        if self.chat_content_tokens not in ("text", "special"):
            raise ConfigError(f"chat_content_tokens must be 'text' or 'special', got {self.chat_content_tokens!r}")
        if not isinstance(self.max_concurrent_image_decodes, int) or self.max_concurrent_image_decodes < 1:
            raise ConfigError("max_concurrent_image_decodes must be a positive integer, got "
                              f"{self.max_concurrent_image_decodes!r}")

    @classmethod
    def pop_from(cls, options: dict[str, Any]) -> "ClientSettings":
        """Take the client's options out of `options` (what is left goes to the engine core)."""
        values = {name: options.pop(name) for name in CLIENT_OPTIONS if name in options}
        if values.get("image_policy", 0) is None:
            values.pop("image_policy")
        return cls(**values)


CLIENT_OPTIONS = ("image_policy", "max_concurrent_image_decodes", "chat_content_tokens")
