"""Where each image's vision tokens sit in a fused prompt: produced by `fusion.fuse_prompt`, carried by the engine's
`Sequence`, read by the block manager (prefix-cache keys) and the vision encoder (which rows to fill)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageSpan:
    """One image's run of vision tokens inside the fused token list.

    `content_hash` identifies the image content (raw bytes + processor options); it keys the prefix cache, so two
    different images with the same placeholder ids never share KV.
    """

    start: int
    length: int
    content_hash: str
    image_index: int

    @property
    def end(self) -> int:
        return self.start + self.length


__all__ = ["ImageSpan"]
