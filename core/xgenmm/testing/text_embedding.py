"""A TEST-ONLY text embedding: a hashed bag of words, deterministic and offline, with no model and no license to
worry about. It exists so that tests and the offline example runs (random checkpoints, whose captions are gibberish
anyway) can build a vector index without downloading anything. It has no notion of meaning (only shared words bring
texts together), so real retrieval uses a real model through the ecosystem's own integration (docs/llamaindex.md,
docs/langchain.md: `sentence-transformers/all-MiniLM-L6-v2`)."""

from __future__ import annotations

import hashlib
import math
import re

__all__ = ["TEST_ONLY_EMBEDDING_DIM", "hashing_text_embedding"]

TEST_ONLY_EMBEDDING_DIM = 256
_WORD = re.compile(r"\w+", re.UNICODE)


def hashing_text_embedding(text: str, dim: int = TEST_ONLY_EMBEDDING_DIM) -> list[float]:
    """A unit vector: each lower-cased word adds +-1 at a hashed position (the signed hashing trick). Identical texts
    get identical vectors; texts sharing words get a positive cosine. Empty text maps to a fixed unit vector."""
    if dim < 2:
        raise ValueError(f"dim must be at least 2, got {dim}")
    vector = [0.0] * dim
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        vector[value % dim] += 1.0 if (value >> 63) & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:
        vector[0], norm = 1.0, 1.0
    return [v / norm for v in vector]
