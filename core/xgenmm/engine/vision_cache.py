"""Resampled image tokens cached by image content hash, bounded in bytes (LRU).

The same picture asked about twice (or by two requests) is encoded once. We cache the perceiver output (LM-ready
tokens), which is 4-5x smaller than the SigLIP features.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class VisionCache:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = int(capacity_bytes)
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, content_hash: str) -> torch.Tensor | None:
        tokens = self._entries.get(content_hash)
        if tokens is None:
            self.misses += 1
            return None
        self._entries.move_to_end(content_hash)
        self.hits += 1
        return tokens

    def put(self, content_hash: str, tokens: torch.Tensor) -> None:
        size = tokens.numel() * tokens.element_size()
        if size > self.capacity_bytes or content_hash in self._entries:
            return
        while self.num_bytes + size > self.capacity_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= old.numel() * old.element_size()
        self._entries[content_hash] = tokens
        self.num_bytes += size

    def __contains__(self, content_hash: str) -> bool:  # no hit / miss counted, no LRU touch
        return content_hash in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.num_bytes = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
