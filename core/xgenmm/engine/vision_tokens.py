"""`VisionTokens`: the native core's vision work, out of its scheduling loop: each image's LM-ready tokens, encoded
once per content (cached by hash, `vision_cache.py`), in groups of a few patches, and, on a GPU, encoded ahead for
the requests at the head of the waiting queue on a side stream (`vision_stream.py`) while the step they wait behind
runs.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

from ..multimodal.image_processing import ProcessedImage
from .vision_cache import VisionCache
from .vision_stream import PendingImageEmbeds

__all__ = ["VisionTokens"]

logger = logging.getLogger("xgenmm.engine")


class VisionTokens:
    """Vision tokens for requests in flight, encoded by `runner` (the model runner: `encode_images`, and
    `encode_images_async` on the side stream); `patch_group` patches go through the encoder per call."""

    def __init__(self, runner: Any, *, cache_bytes: int, patch_group: int, prefetch: bool, prefetch_patches: int):
        self.runner = runner
        self.cache = VisionCache(cache_bytes)
        self.patch_group = patch_group
        self.prefetch_enabled = prefetch
        self.prefetch_patches = prefetch_patches
        self._prefetching: dict[str, tuple[PendingImageEmbeds, int, int]] = {}  # hash -> (group, index, patches)

    @property
    def hit_rate(self) -> float:
        return self.cache.hit_rate

    def tokens_for(self, requests: Iterable[Any]) -> None:
        """Set `req.image_embeds` (one tensor per image, in order) on every request that has none yet. `fresh` holds
        this call's tokens by hash, so a cache eviction in between cannot lose one."""
        need = [req for req in requests if req.image_embeds is None]
        todo: dict[str, ProcessedImage] = {}
        fresh: dict[str, torch.Tensor] = {}
        for req in need:
            for img in req.prepared.images:
                h = img.content_hash
                if h in fresh or h in todo:
                    continue
                if (cached := self.cache.get(h)) is not None:
                    fresh[h] = cached
                elif h in self._prefetching:  # encoded ahead on the side stream: wait for it on this stream
                    fresh[h] = self._take_prefetched(h)
                    self.cache.put(h, fresh[h])
                else:
                    todo[h] = img
        if todo:
            # Encode in groups of a few patches: one huge batch of every image's patches is slower on a CPU (the
            # perceiver's [patches, 857, 2 * 1536] intermediates fall out of cache) and no faster on a GPU.
            encoded, group, patches = [], [], 0
            for img in todo.values():
                group.append(img)
                patches += img.num_patches
                if patches >= self.patch_group:
                    encoded += self.runner.encode_images(group)
                    group, patches = [], 0
            if group:
                encoded += self.runner.encode_images(group)
            for h, tokens in zip(todo, encoded):
                fresh[h] = tokens
                self.cache.put(h, tokens)
        for req in need:
            req.image_embeds = [fresh[img.content_hash] for img in req.prepared.images]

    def prefetch(self, waiting: list[Any]) -> None:
        """Start encoding the uncached images of `waiting` requests (head of the queue first) on the vision side
        stream, at most `prefetch_patches` patches ahead at once. A failure here only logs: the images are encoded
        again when their request is scheduled, and fail that request alone if they really are bad."""
        try:
            wanted = {img.content_hash for req in waiting for img in req.prepared.images}
            # Encodings nobody waits for any more (their request was aborted) go to the cache, freeing budget.
            for h in [h for h, (pending, _, _) in self._prefetching.items() if h not in wanted and pending.ready()]:
                self.cache.put(h, self._take_prefetched(h))
            budget = self.prefetch_patches - sum(p for _, _, p in self._prefetching.values())
            group: dict[str, ProcessedImage] = {}
            for req in waiting:
                for img in req.prepared.images:
                    h = img.content_hash
                    if h in group or h in self._prefetching or h in self.cache:
                        continue
                    if img.num_patches > budget:
                        budget = 0
                        break
                    group[h] = img
                    budget -= img.num_patches
                if budget <= 0:
                    break
            if group:
                pending = self.runner.encode_images_async(list(group.values()))
                for i, (h, img) in enumerate(group.items()):
                    self._prefetching[h] = (pending, i, img.num_patches)
        except Exception:  # noqa: BLE001 - prefetching is an optimisation; the normal path still encodes
            logger.warning("image prefetch failed; images will be encoded when scheduled", exc_info=True)

    def _take_prefetched(self, content_hash: str) -> torch.Tensor:
        pending, index, _ = self._prefetching.pop(content_hash)
        return pending.result()[index]
