"""Paged KV block pool: reference counts, prefix caching by chained block hashes, LRU eviction.

Pure Python, no tensors: a block id indexes the first dimension of the model runner's KV cache tensors.

Prefix caching. Block i of a sequence (tokens [i*B, (i+1)*B)) is hashed once it is full as
    blake2b(parent_hash, block token ids, extra_keys)
with `extra_keys` = ((span.content_hash, span.start - block_start) for every image span overlapping the block), so
the KV of a block is shared only when every token before and in it, and every image feeding it (at the same offset),
are the same. The hash is only a lookup key: on a hit the stored (parent, tokens, extra_keys) are compared too.

Free blocks. A freed block keeps its hash and stays findable until it is reused. Uncached free blocks are handed
out first; cached ones are evicted least-recently-freed first. `free` releases a sequence's blocks tail first, so
the end of a chain is evicted before its (more shareable) beginning.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence as SequenceType

from xgenmm.engine.sequence import Sequence
from xgenmm.multimodal.spans import ImageSpan
from xgenmm.errors import ConfigError

ExtraKeys = tuple[tuple[str, int], ...]

ROOT_HASH = hashlib.blake2b(b"xgenmm-prefix-cache-root", digest_size=16).digest()


def hash_block(parent_hash: bytes, token_ids: SequenceType[int], extra_keys: ExtraKeys) -> bytes:
    """Strong, process-independent hash of one full block (length-prefixed fields, fixed little-endian widths)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    h.update(struct.pack("<I", len(extra_keys)))
    for content_hash, offset in extra_keys:
        encoded = content_hash.encode("utf-8")
        h.update(struct.pack("<I", len(encoded)))
        h.update(encoded)
        h.update(struct.pack("<q", offset))
    return h.digest()


def block_extra_keys(spans: tuple[ImageSpan, ...], block_start: int, block_end: int) -> ExtraKeys:
    """(content_hash, offset of the image start relative to the block start) for each image overlapping the block."""
    return tuple(
        (span.content_hash, span.start - block_start)
        for span in spans
        if span.start < block_end and span.end > block_start
    )


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    # What the hash was computed from, to reject hash collisions on a hit.
    key: tuple[bytes, tuple[int, ...], ExtraKeys] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ConfigError(f"the KV cache needs at least 1 block, got num_blocks={num_blocks}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks: list[Block] = [Block(i) for i in range(num_blocks)]
        self._free_uncached: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: first = least recently freed
        self._hash_to_block: dict[bytes, int] = {}
        self._owners: dict[int, Sequence] = {}  # seq_id -> sequence holding blocks
        self._hash_fn = hash_block
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of which served by the cache
        self.num_evictions = 0  # cached blocks reused for other content

    # ---- sizes and stats -----------------------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks (free or in use) currently findable by the prefix cache."""
        return len(self._hash_to_block)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- hashing -------------------------------------------------------------------------------------------------
    def _block_key(self, seq: Sequence, index: int) -> tuple[bytes, tuple[int, ...], ExtraKeys]:
        start = index * self.block_size
        end = start + self.block_size
        parent = seq.block_hashes[index - 1] if index > 0 else ROOT_HASH
        return parent, tuple(seq.token_ids[start:end]), block_extra_keys(seq.image_spans, start, end)

    def _ensure_block_hashes(self, seq: Sequence, num_blocks: int) -> None:
        """Extend seq.block_hashes to cover its first `num_blocks` blocks (each must be full)."""
        assert num_blocks * self.block_size <= seq.num_tokens
        while len(seq.block_hashes) < num_blocks:
            seq.block_hashes.append(self._hash_fn(*self._block_key(seq, len(seq.block_hashes))))

    def _lookup(self, seq: Sequence, index: int) -> int | None:
        block_id = self._hash_to_block.get(seq.block_hashes[index])
        if block_id is None or self.blocks[block_id].key != self._block_key(seq, index):
            return None  # miss, or a hash collision with different content
        return block_id

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of seq's tokens, without taking them (no side effect on the pool).

        Never covers the whole sequence: at least its last token is left to compute, to produce logits.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for index in range(max_blocks):
            self._ensure_block_hashes(seq, index + 1)
            block_id = self._lookup(seq, index)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    # ---- capacity ------------------------------------------------------------------------------------------------
    def max_schedulable_tokens(self, seq: Sequence, prefix_blocks: list[int] | None = None) -> int:
        """How many new tokens seq could get KV slots for right now.

        With `prefix_blocks` (from `match_prefix`, for a sequence holding no blocks yet) it answers for the state after
        `allocate_prefix`: matched blocks that are free now leave the free pool when taken.
        """
        if prefix_blocks is None:
            held, computed, free = len(seq.block_table), seq.num_computed_tokens, self.num_free_blocks
        else:
            assert not seq.block_table, "prefix_blocks is only for a sequence that holds no blocks"
            taken_from_free = sum(1 for b in prefix_blocks if self.blocks[b].ref_count == 0)
            held, computed = len(prefix_blocks), len(prefix_blocks) * self.block_size
            free = self.num_free_blocks - taken_from_free
        return max(0, (held + free) * self.block_size - computed)

    def can_allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        return num_new_tokens <= self.max_schedulable_tokens(seq)

    def can_admit(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int]) -> bool:
        """Whether allocate_prefix(seq) followed by allocate_slots(seq, num_new_tokens) would succeed."""
        return num_new_tokens <= self.max_schedulable_tokens(seq, prefix_blocks)

    # ---- allocation ----------------------------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._free_cached.pop(block_id)  # a findable free block is always a cached one
        block.ref_count += 1

    def _pop_free_block(self) -> int:
        if self._free_uncached:
            block_id, _ = self._free_uncached.popitem(last=False)
        else:
            block_id, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
            block = self.blocks[block_id]
            assert block.block_hash is not None
            del self._hash_to_block[block.block_hash]
            self.num_evictions += 1
            block.block_hash = None
            block.key = None
        self.blocks[block_id].ref_count = 1
        return block_id

    def allocate_prefix(self, seq: Sequence) -> int:
        """Admission: take the cached prefix blocks; set block_table, num_computed_tokens, num_cached_tokens."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks; free it before admitting it again")
        hits = self.match_prefix(seq)
        for block_id in hits:
            self._take(block_id)
        seq.block_table = list(hits)
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_cached_tokens
        if hits:
            self._owners[seq.seq_id] = seq
        return seq.num_cached_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow block_table to cover num_computed_tokens + num_new_tokens; False (nothing taken) if impossible."""
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._pop_free_block())
        self._owners[seq.seq_id] = seq
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Make the blocks that became full (their KV computed) findable by later requests."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return
        self._ensure_block_hashes(seq, num_full)
        for index in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[index]]
            block_hash = seq.block_hashes[index]
            if block.block_hash is not None:
                assert block.block_hash == block_hash, f"block {block.block_id} of {seq} holds other content"
            elif block_hash not in self._hash_to_block:
                # (If another block already holds this content, e.g. an identical prompt computed in the same
                # step, keep the first one; this block stays private.)
                block.block_hash = block_hash
                block.key = self._block_key(seq, index)
                self._hash_to_block[block_hash] = block.block_id
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Drop seq's references (idempotent). Blocks reaching 0 become free; cached ones stay findable."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_uncached[block_id] = None
        seq.block_table = []
        seq.num_registered_blocks = 0
        self._owners.pop(seq.seq_id, None)

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (blocks in use keep their KV, just stop being shareable). Returns how many."""
        dropped = len(self._hash_to_block)
        for block_id in self._hash_to_block.values():
            block = self.blocks[block_id]
            block.block_hash = None
            block.key = None
        self._hash_to_block.clear()
        self._free_uncached.update(self._free_cached)
        self._free_cached.clear()
        return dropped

    # ---- checks --------------------------------------------------------------------------------------------------
    def check_invariants(self, seqs: Iterable[Sequence] | None = None) -> None:
        """Assert the pool is consistent. With `seqs`, also that exactly those with a block table hold blocks."""
        n = self.num_total_blocks
        free_uncached, free_cached = set(self._free_uncached), set(self._free_cached)
        assert not free_uncached & free_cached, "a block is in both free lists"
        assert len(free_uncached) + len(free_cached) == self.num_free_blocks
        counts = [0] * n
        for seq in self._owners.values():
            assert seq.block_table, f"{seq} is registered as an owner but holds no blocks"
            assert len(set(seq.block_table)) == len(seq.block_table), f"{seq} holds a block twice"
            assert len(seq.block_table) * self.block_size >= seq.num_computed_tokens, f"{seq}: table too short"
            for index, block_id in enumerate(seq.block_table):
                counts[block_id] += 1
                block = self.blocks[block_id]
                if block.block_hash is not None:
                    assert index < len(seq.block_hashes) and seq.block_hashes[index] == block.block_hash, (
                        f"{seq} position {index} holds cached block {block_id} of other content"
                    )
        if seqs is not None:
            holders = {s.seq_id for s in seqs if s.block_table}
            assert holders == set(self._owners), f"block holders {sorted(self._owners)} != {sorted(holders)}"
        used = 0
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} != {counts[block.block_id]} block tables"
            )
            is_free = block.block_id in free_uncached or block.block_id in free_cached
            assert is_free == (block.ref_count == 0), f"block {block.block_id}: free={is_free}, ref={block.ref_count}"
            used += block.ref_count > 0
            if block.block_id in free_cached:
                assert block.block_hash is not None
            if block.block_id in free_uncached:
                assert block.block_hash is None
            if block.block_hash is not None:
                assert self._hash_to_block.get(block.block_hash) == block.block_id
                assert block.key is not None and self._hash_fn(*block.key) == block.block_hash
        assert used + self.num_free_blocks == n, "free + used != total"
        for block_hash, block_id in self._hash_to_block.items():
            assert self.blocks[block_id].block_hash == block_hash
        if not self.enable_prefix_caching:
            assert not self._hash_to_block and not self._free_cached
