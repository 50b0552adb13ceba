"""BlockManager: ref counts, prefix caching keyed by content (images by content hash and offset), LRU eviction."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xgenmm.engine.block_manager import ROOT_HASH, BlockManager, block_extra_keys, hash_block
from xgenmm.special_tokens import IMAGE_TOKEN_ID as P  # image positions hold the <image> id
from xgenmm.engine.sequence import Sequence
from xgenmm.multimodal.spans import ImageSpan
from xgenmm.errors import ConfigError, PromptError


def make_seq(tokens, spans=(), request_id="r"):
    return Sequence(request_id, tokens, image_spans=spans, max_tokens=8)


def compute_all(bm: BlockManager, seq: Sequence) -> int:
    """Admit seq, give it slots for all its tokens, mark them computed and cache full blocks; returns cached tokens."""
    cached = bm.allocate_prefix(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return cached


# ---- hashing --------------------------------------------------------------------------------------------------------


def test_hash_is_stable_and_separates_fields():
    # A fixed value: the encoding must not depend on the process (no salted hash()).
    assert hash_block(ROOT_HASH, [1, 2, 3], ()).hex() == hash_block(ROOT_HASH, (1, 2, 3), ()).hex()
    assert hash_block(ROOT_HASH, [1, 2, 3], ()).hex() == "92eed410bd506c9d6c569fcad037b80a"
    base = hash_block(ROOT_HASH, [P, P], (("img", 0),))
    assert base != hash_block(ROOT_HASH, [P, P], (("img", 1),))  # same image, other offset
    assert base != hash_block(ROOT_HASH, [P, P], (("other", 0),))  # other image
    assert base != hash_block(ROOT_HASH, [P, P], ())  # no image
    assert base != hash_block(b"\x01" * 16, [P, P], (("img", 0),))  # other parent
    # Length prefixes: moving bytes between fields never collides.
    assert hash_block(ROOT_HASH, [1], (("ab", 0),)) != hash_block(ROOT_HASH, [1], (("a", 0), ("b", 0)))


def test_extra_keys_cover_every_overlapping_span_with_relative_offsets():
    spans = (ImageSpan(2, 5, "A", 0), ImageSpan(7, 2, "B", 1))
    assert block_extra_keys(spans, 0, 4) == (("A", 2),)
    assert block_extra_keys(spans, 4, 8) == (("A", -2), ("B", 3))
    assert block_extra_keys(spans, 8, 12) == (("B", -1),)
    assert block_extra_keys(spans, 12, 16) == ()


def test_sequence_rejects_bad_spans_and_empty_prompts():
    with pytest.raises(PromptError):
        make_seq([])
    with pytest.raises(PromptError, match="outside"):
        make_seq([P, P], (ImageSpan(1, 2, "A", 0),))
    with pytest.raises(PromptError):
        make_seq([P] * 4, (ImageSpan(0, 3, "A", 0), ImageSpan(2, 2, "B", 1)))
    with pytest.raises(ConfigError):
        BlockManager(0)


# ---- prefix sharing -------------------------------------------------------------------------------------------------


def image_prompt(prefix_len=4, image_len=6, suffix=(7, 8, 9), image_hash="imgA"):
    tokens = list(range(1, prefix_len + 1)) + [P] * image_len + list(suffix)
    return tokens, (ImageSpan(prefix_len, image_len, image_hash, 0),)


def test_same_prompt_and_image_share_blocks():
    bm = BlockManager(32, block_size=4)
    tokens, spans = image_prompt()  # 13 tokens: 3 full blocks
    a, b = make_seq(tokens, spans), make_seq(tokens, spans)
    assert compute_all(bm, a) == 0
    assert bm.allocate_prefix(b) == 12
    assert b.block_table == a.block_table[:3]
    assert b.num_computed_tokens == b.num_cached_tokens == 12
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table[:3])
    bm.check_invariants([a, b])
    assert bm.prefix_cache_queries == 26 and bm.prefix_cache_hits == 12
    assert bm.prefix_cache_hit_rate == pytest.approx(12 / 26)


def test_different_image_with_same_placeholders_does_not_share():
    bm = BlockManager(32, block_size=4)
    tokens, spans_a = image_prompt(image_hash="imgA")
    _, spans_b = image_prompt(image_hash="imgB")
    a, b = make_seq(tokens, spans_a), make_seq(tokens, spans_b)
    compute_all(bm, a)
    # Only the text block before the image is shared.
    assert bm.allocate_prefix(b) == 4
    assert b.block_table == a.block_table[:1]
    assert bm.allocate_slots(b, b.num_tokens - 4)
    assert set(b.block_table[1:]).isdisjoint(a.block_table)
    bm.check_invariants([a, b])


def test_same_images_at_other_offsets_do_not_share():
    bm = BlockManager(32, block_size=8)
    tokens = [1, 2] + [P] * 6 + [3, 4, 5, 6, 7, 8, 9, 10, 11]
    a = make_seq(tokens, (ImageSpan(2, 3, "X", 0), ImageSpan(5, 3, "W", 1)))
    b = make_seq(tokens, (ImageSpan(2, 3, "W", 0), ImageSpan(5, 3, "X", 1)))  # same images, swapped places
    compute_all(bm, a)
    assert bm.allocate_prefix(b) == 0
    c = make_seq(tokens, (ImageSpan(2, 3, "X", 0), ImageSpan(5, 3, "W", 1)))
    assert bm.allocate_prefix(c) == 16
    # One image, identical token ids, shifted by one position.
    d = make_seq(tokens, (ImageSpan(2, 3, "X", 0),))
    compute_all(bm, d)
    assert bm.allocate_prefix(make_seq(tokens, (ImageSpan(3, 3, "X", 0),))) == 0
    assert bm.allocate_prefix(make_seq(tokens, (ImageSpan(2, 3, "X", 0),))) == 16


def test_image_spanning_blocks_changes_every_block_it_touches():
    bm = BlockManager(32, block_size=4)
    tokens, spans_a = image_prompt(prefix_len=2, image_len=8, suffix=(5, 6, 7, 8, 9))  # image covers blocks 0-2
    _, spans_b = image_prompt(prefix_len=2, image_len=8, suffix=(5, 6, 7, 8, 9), image_hash="imgB")
    a = make_seq(tokens, spans_a)
    compute_all(bm, a)
    assert bm.allocate_prefix(make_seq(tokens, spans_b)) == 0
    assert bm.allocate_prefix(make_seq(tokens, spans_a)) == 12


def test_never_marks_the_whole_sequence_computed():
    bm = BlockManager(8, block_size=4)
    a = make_seq(list(range(8)))  # exactly 2 full blocks
    compute_all(bm, a)
    b = make_seq(list(range(8)))
    assert bm.allocate_prefix(b) == 4  # the last block is recomputed to get logits of the last token
    assert b.num_computed_tokens == 4
    assert bm.allocate_prefix(make_seq(list(range(9)))) == 8


def test_generated_tokens_are_cached_too():
    bm = BlockManager(8, block_size=4)
    a = make_seq([1, 2, 3])
    compute_all(bm, a)
    assert bm.num_cached_blocks == 0
    for t in (4, 5, 6):
        a.append_token(t)
        assert bm.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 1
    b = make_seq([1, 2, 3, 4, 5])
    assert bm.allocate_prefix(b) == 4
    assert b.block_table == a.block_table[:1]


def test_identical_prompts_computed_together_keep_one_cached_copy():
    bm = BlockManager(8, block_size=4)
    a, b = make_seq(list(range(9))), make_seq(list(range(9)))
    for s in (a, b):
        bm.allocate_prefix(s)
        assert bm.allocate_slots(s, 9)
    for s in (a, b):
        s.num_computed_tokens = 9
        bm.cache_full_blocks(s)
    assert bm.num_cached_blocks == 2
    c = make_seq(list(range(9)))
    bm.allocate_prefix(c)
    assert c.block_table == a.block_table[:2]
    bm.check_invariants([a, b, c])


def test_collision_guard_compares_stored_content():
    bm = BlockManager(8, block_size=2)
    bm._hash_fn = lambda *key: b"\x00" * 16  # every block collides
    a = make_seq([1, 2, 3, 4, 5])
    compute_all(bm, a)
    assert bm.allocate_prefix(make_seq([9, 9, 9, 9, 9])) == 0
    assert bm.allocate_prefix(make_seq([1, 2, 7])) == 2  # the one registered block really matches


def test_prefix_caching_disabled():
    bm = BlockManager(8, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5])
    compute_all(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.allocate_prefix(make_seq([1, 2, 3, 4, 5])) == 0
    assert bm.prefix_cache_queries == 0 and bm.prefix_cache_hit_rate == 0.0
    bm.check_invariants()


# ---- allocation, freeing, eviction ----------------------------------------------------------------------------------


def test_allocate_slots_is_all_or_nothing():
    bm = BlockManager(4, block_size=4)
    a = make_seq(list(range(10)))
    bm.allocate_prefix(a)
    assert bm.can_allocate_slots(a, 16) and not bm.can_allocate_slots(a, 17)
    assert not bm.allocate_slots(a, 17)
    assert a.block_table == [] and bm.num_free_blocks == 4
    assert bm.allocate_slots(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    assert bm.allocate_slots(a, 10)  # already covered: takes nothing
    assert len(a.block_table) == 3
    assert bm.usage == pytest.approx(0.75)
    bm.check_invariants([a])


def test_free_is_idempotent_and_keeps_cached_blocks_findable():
    bm = BlockManager(4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    compute_all(bm, a)
    table = list(a.block_table)
    bm.free(a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and a.block_table == []
    bm.check_invariants([a])
    b = make_seq([1, 2, 3, 4, 5])
    assert bm.allocate_prefix(b) == 4
    assert b.block_table == table[:2]
    assert bm.num_free_blocks == 2  # taking cached free blocks removes them from the free pool


def test_uncached_free_blocks_go_first_then_least_recently_freed_cached():
    bm = BlockManager(6, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])  # 2 full cached blocks + 1 partial
    b = make_seq([6, 7, 8, 9, 10])
    compute_all(bm, a)
    compute_all(bm, b)
    a_full, b_full = a.block_table[:2], b.block_table[:2]
    bm.free(a)  # tail first: a_full[1] is the least recently freed
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4

    def hits(tokens):
        return bm.match_prefix(make_seq(tokens))

    c = make_seq([20, 21, 22, 23, 24, 25, 26, 27])
    bm.allocate_prefix(c)
    assert bm.allocate_slots(c, 4)  # the 2 uncached free blocks first
    assert bm.num_cached_blocks == 4
    assert bm.allocate_slots(c, 8)  # evicts a_full[1] (a's tail), then a_full[0]
    assert c.block_table[2:] == [a_full[1], a_full[0]]
    assert hits([1, 2, 3, 4, 5]) == [] and hits([6, 7, 8, 9, 10]) == b_full
    assert bm.allocate_slots(c, 10)
    assert c.block_table[4] == b_full[1]
    assert hits([6, 7, 8, 9, 10]) == b_full[:1]
    bm.check_invariants([c])


def test_a_reused_cached_block_moves_to_the_back_of_the_lru():
    bm = BlockManager(4, block_size=2)
    a, b = make_seq([1, 2, 3]), make_seq([4, 5, 6])
    compute_all(bm, a)
    compute_all(bm, b)
    a0, b0 = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)  # LRU of cached blocks: a0, b0
    a2 = make_seq([1, 2, 9])
    assert bm.allocate_prefix(a2) == 2
    bm.free(a2)  # a0 taken and freed again: now b0, a0
    c = make_seq([7] * 8)
    bm.allocate_prefix(c)
    assert bm.allocate_slots(c, 6)  # 2 uncached + 1 eviction
    assert c.block_table[2] == b0
    assert bm.match_prefix(make_seq([1, 2, 3])) == [a0] and bm.match_prefix(make_seq([4, 5, 6])) == []


def test_reset_prefix_cache_forgets_hashes():
    bm = BlockManager(6, block_size=2)
    a, b = make_seq([1, 2, 3, 4, 5]), make_seq([6, 7, 8])
    compute_all(bm, a)
    compute_all(bm, b)
    bm.free(a)
    assert bm.reset_prefix_cache() == 3
    assert bm.num_cached_blocks == 0
    assert bm.allocate_prefix(make_seq([1, 2, 3, 4, 5])) == 0
    bm.check_invariants([b])


# ---- random operations ----------------------------------------------------------------------------------------------

PROMPTS = [
    ([1, 2, 3, 4] + [P] * 5 + [5, 6], (ImageSpan(4, 5, "imgA", 0),)),
    ([1, 2, 3, 4] + [P] * 5 + [5, 6], (ImageSpan(4, 5, "imgB", 0),)),
    ([1, 2, 3, 4, 5] + [P] * 5 + [6], (ImageSpan(5, 5, "imgA", 0),)),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], ()),
]


def fingerprints(seq: Sequence) -> list:
    """What the KV of each position depends on: every earlier token and image position."""
    out, previous = [], 0
    for p, t in enumerate(seq.token_ids):
        image = next(((s.content_hash, p - s.start) for s in seq.image_spans if s.start <= p < s.end), None)
        previous = hash((previous, t, image))
        out.append(previous)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(1, 12),
    block_size=st.sampled_from([1, 2, 4]),
    ops=st.lists(st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 50)), max_size=40),
)
def test_random_operations_keep_the_pool_consistent_and_kv_correct(num_blocks, block_size, ops):
    bm = BlockManager(num_blocks, block_size)
    kv: dict[int, dict[int, int]] = {}  # block -> offset -> fingerprint written there
    live: list[Sequence] = []

    def write(seq: Sequence, n: int) -> None:
        fps = fingerprints(seq)
        for q in range(seq.num_computed_tokens):  # the cached prefix holds exactly this sequence's KV
            assert kv[seq.block_table[q // block_size]][q % block_size] == fps[q]
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = seq.block_table[p // block_size]
            assert bm.blocks[block].ref_count == 1, "writing into a shared block"
            kv.setdefault(block, {})[p % block_size] = fps[p]
        seq.num_computed_tokens += n
        bm.cache_full_blocks(seq)

    for op, x in ops:
        if op == "admit":
            tokens, spans = PROMPTS[x % len(PROMPTS)]
            seq = make_seq(tokens, spans)
            bm.allocate_prefix(seq)
            n = seq.num_tokens - seq.num_computed_tokens
            if bm.allocate_slots(seq, n):
                write(seq, n)
                live.append(seq)
            else:
                bm.free(seq)
        elif op == "grow" and live:
            seq = live[x % len(live)]
            seq.append_token(x % 7)
            if bm.allocate_slots(seq, 1):
                write(seq, 1)
            else:
                seq.token_ids.pop()
        elif op == "free" and live:
            bm.free(live.pop(x % len(live)))
        bm.check_invariants(live)
    for seq in live:
        bm.free(seq)
    bm.check_invariants([])
    assert bm.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_cpu_kv_pool_default_holds_a_batch_of_image_requests_of_the_real_model(monkeypatch):
    """The default CPU KV pool scales with the model's bytes per token (a fixed 512 MiB held two image requests of
    the full model), stays within 512 MiB..4 GiB, and takes at most a quarter of the free memory."""
    from xgenmm.engine import model_runner as mr

    monkeypatch.setattr(mr, "_available_memory_bytes", lambda: 64 * 1024**3)
    full_bf16 = 32 * 2 * 3072 * 2  # layers x (k, v) x width x bytes
    assert mr.default_cpu_kv_cache_bytes(full_bf16) == 4 * 1024**3
    assert mr.default_cpu_kv_cache_bytes(full_bf16 // 4) == full_bf16 // 4 * mr.CPU_KV_CACHE_TOKENS  # scaled: 1.5 GiB
    assert mr.default_cpu_kv_cache_bytes(1024) == 512 * 1024**2  # a tiny model keeps the floor
    monkeypatch.setattr(mr, "_available_memory_bytes", lambda: 8 * 1024**3)
    assert mr.default_cpu_kv_cache_bytes(full_bf16) == 2 * 1024**3
    monkeypatch.setattr(mr, "_available_memory_bytes", lambda: 1024**3)
    assert mr.default_cpu_kv_cache_bytes(full_bf16) == 512 * 1024**2
