"""Scheduler: token budget, chunked prefill, decodes first, FCFS admission, preemption by recompute, abort.

`SimEngine` drives the scheduler exactly like the engine does and simulates the KV cache: the "KV" written at a
position is a fingerprint of every token (and image position) up to it, checked whenever it is read back, so any
wrong sharing, lost block or mis-addressed slot shows. Generation is a deterministic function of (sequence,
position), so the final token lists are known in advance.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from xgenmm.engine.block_manager import BlockManager
from xgenmm.engine.scheduler import Scheduler, SchedulerOutput
from xgenmm.special_tokens import IMAGE_TOKEN_ID as P  # image positions hold the <image> id
from xgenmm.engine.sequence import Sequence, SequenceStatus
from xgenmm.multimodal.spans import ImageSpan
from xgenmm.errors import PromptTooLongError

IMAGE_LENGTHS = {"imgA": 5, "imgB": 5, "imgC": 7}


def build_prompt(parts) -> tuple[list[int], tuple[ImageSpan, ...]]:
    """parts: ints (text ids) and image content hashes."""
    tokens: list[int] = []
    spans = []
    for part in parts:
        if isinstance(part, str):
            spans.append(ImageSpan(len(tokens), IMAGE_LENGTHS[part], part, len(spans)))
            tokens += [P] * IMAGE_LENGTHS[part]
        else:
            tokens.append(part)
    return tokens, tuple(spans)


def generated_token(seq: Sequence, position: int) -> int:
    return (int(seq.request_id[1:]) * 7919 + seq.sample_index * 104729 + position * 31) % 997 + 1


def stops(token: int) -> bool:
    return token % 6 == 0  # a pseudo-EOS


def expected_output(seq: Sequence, ignore_eos: bool = False) -> list[int]:
    out: list[int] = []
    while True:
        token = generated_token(seq, seq.num_prompt_tokens + len(out))
        out.append(token)
        if (stops(token) and not ignore_eos) or len(out) == seq.max_tokens:
            return out


def fingerprints(seq: Sequence) -> list[int]:
    out, previous = [], 0
    for p, t in enumerate(seq.token_ids):
        image = next(((s.content_hash, p - s.start) for s in seq.image_spans if s.start <= p < s.end), None)
        previous = hash((previous, t, image))
        out.append(previous)
    return out


class SimEngine:
    def __init__(self, num_blocks, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=10**6,
                 enable_prefix_caching=True, ignore_eos=False):
        self.ignore_eos = ignore_eos
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, max_model_len)
        self.kv: dict[int, dict[int, int]] = {}
        self.all: list[Sequence] = []
        self.next_request = 0
        self.outputs: list[SchedulerOutput] = []
        self.finished_for_capacity: set[int] = set()
        self.num_chunked = 0  # scheduled items that left tokens for a later step

    @property
    def live(self) -> list[Sequence]:
        return [s for s in self.all if not s.is_finished]

    def add(self, parts, n=1, max_tokens=8, arrival_time=None) -> list[Sequence]:
        tokens, spans = build_prompt(parts)
        request_id = f"r{self.next_request}"
        self.next_request += 1
        seqs = [
            Sequence(request_id, tokens, image_spans=spans, sample_index=i, max_tokens=max_tokens,
                     arrival_time=arrival_time)
            for i in range(n)
        ]
        for seq in seqs:
            self.sched.add(seq)
            self.all.append(seq)
        return seqs

    def check(self) -> None:
        self.bm.check_invariants(self.live)
        for seq in self.all:
            if seq.status is not SequenceStatus.RUNNING:
                assert seq.block_table == [], f"{seq} holds blocks"
        assert {s.seq_id for s in self.sched.running} | {s.seq_id for s in self.sched.waiting} == {
            s.seq_id for s in self.live
        }

    def step(self, abort_mid_step: str | None = None) -> SchedulerOutput:
        sched, bm = self.sched, self.bm
        waiting_before = list(sched.waiting)
        decodes_before = [s for s in sched.running if s.num_uncomputed_tokens == 1]
        out = sched.schedule()
        self.outputs.append(out)
        seqs = [item.seq for item in out.scheduled]

        # Budget and per-sequence limits.
        assert out.num_batched_tokens == sum(item.num_new_tokens for item in out.scheduled)
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len({s.seq_id for s in seqs}) == len(seqs)
        assert len(sched.running) <= sched.max_num_seqs
        for item in out.scheduled:
            assert 1 <= item.num_new_tokens <= item.seq.num_uncomputed_tokens
            if item.num_new_tokens < item.seq.num_uncomputed_tokens:
                # A chunk is cut only by the budget, or by the pool for a sequence running alone.
                self.num_chunked += 1
                assert out.num_batched_tokens == sched.max_num_batched_tokens or sched.num_running == 1
            assert item.seq.status is SequenceStatus.RUNNING
        # Decodes are never starved: only memory pressure can keep a decode from running.
        for seq in decodes_before:
            assert seq in seqs or seq in out.preempted or seq in out.finished_for_capacity
            if not out.preempted and not out.finished_for_capacity:
                assert seq in seqs
        # FCFS: what left the waiting queue is its head, in order; nothing admitted in a step that preempted.
        left = [s for s in waiting_before if s in seqs or s in out.finished_for_capacity]
        assert left == waiting_before[: len(left)]
        assert [s for s in seqs if s in waiting_before] == [s for s in left if s in seqs]
        if out.preempted:
            assert not any(s in waiting_before for s in seqs)
        for seq in out.preempted:
            assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0 and not seq.block_table
        if out.preempted:
            assert list(sched.waiting)[: len(out.preempted)] == sorted(out.preempted, key=lambda s: s.priority)
        for seq in out.finished_for_capacity:
            self.finished_for_capacity.add(seq.seq_id)
            assert seq.is_finished and seq.finish_reason == "length"
            assert seq.num_tokens > bm.num_total_blocks * bm.block_size
        self.check()

        # "Run the model": read back the cached prefix, write the new KV.
        for item in out.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            fps = fingerprints(seq)
            assert len(seq.block_table) * bm.block_size >= start + item.num_new_tokens
            for q in range(start):
                assert self.kv[seq.block_table[q // bm.block_size]][q % bm.block_size] == fps[q], (seq, q)
            for p in range(start, start + item.num_new_tokens):
                block = seq.block_table[p // bm.block_size]
                assert bm.blocks[block].ref_count == 1, "writing into a shared block"
                self.kv.setdefault(block, {})[p % bm.block_size] = fps[p]

        if abort_mid_step is not None:
            sched.abort(abort_mid_step)
        ready = sched.on_step_done(out)
        assert ready == [s for s in seqs if not s.is_finished and s.num_computed_tokens == s.num_tokens]
        for seq in ready:
            token = generated_token(seq, seq.num_tokens)
            seq.append_token(token)
            if stops(token) and not self.ignore_eos:
                sched.finish(seq, "stop")
            elif seq.num_output_tokens == seq.max_tokens:
                sched.finish(seq, "length")
        self.check()
        return out

    def drain(self, max_steps=5000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                break
            self.step()
        assert not self.sched.has_unfinished(), "the scheduler made no progress"
        self.check_final()

    def check_final(self) -> None:
        for seq in self.all:
            assert seq.is_finished
            expected = expected_output(seq, self.ignore_eos)
            if seq.finish_reason != "abort" and seq.seq_id not in self.finished_for_capacity:
                assert seq.output_token_ids == expected, seq
            else:  # aborted or finished for capacity: a prefix, nothing lost or duplicated
                assert seq.output_token_ids == expected[: seq.num_output_tokens], seq
        self.bm.check_invariants([])
        assert self.bm.num_free_blocks == self.bm.num_total_blocks
        assert all(block.ref_count == 0 for block in self.bm.blocks)


# ---- deterministic behaviour ----------------------------------------------------------------------------------------


def test_chunked_prefill_respects_budget_and_never_stalls_decodes():
    sim = SimEngine(ignore_eos=True, num_blocks=200, block_size=4, max_num_batched_tokens=16)
    [short] = sim.add([1, 2, 3], max_tokens=50)
    sim.step()  # short prefilled
    [long] = sim.add(list(range(10, 70)) + ["imgC"] + [5] * 30)  # 97 tokens
    budgets = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = sim.step()
        assert out.scheduled[0].seq is short and out.scheduled[0].num_new_tokens == 1
        budgets.append(out.num_batched_tokens)
    assert all(b == 16 for b in budgets[:-1])
    assert len(budgets) == -(-97 // 15)


def test_running_prefill_chunk_comes_after_decodes_even_if_older():
    sim = SimEngine(ignore_eos=True, num_blocks=200, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    [young] = sim.add([1, 2], max_tokens=30, arrival_time=2.0)
    sim.step()
    [old] = sim.add(list(range(1, 40)), arrival_time=1.0)  # arrived earlier: ahead of young in the running order
    out = sim.step()
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(young, 1), (old, 7)]
    assert sim.sched.running == [old, young]
    out = sim.step()
    # young decodes first; old's chunk takes the rest of the budget.
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(young, 1), (old, 7)]


def test_fcfs_head_of_line_is_not_overtaken():
    sim = SimEngine(ignore_eos=True, num_blocks=6, block_size=4, max_num_batched_tokens=64)
    [a] = sim.add(list(range(1, 14)), max_tokens=20)  # 13 tokens: 4 blocks
    sim.step()
    [big] = sim.add(list(range(20, 33)))  # needs 4 blocks, only 2 free
    [small] = sim.add([1])  # would fit in 1 block
    out = sim.step()
    assert [i.seq for i in out.scheduled] == [a]
    assert list(sim.sched.waiting) == [big, small]


def test_preemption_evicts_the_newest_and_recomputes_its_tokens():
    sim = SimEngine(ignore_eos=True, num_blocks=4, block_size=2, max_num_batched_tokens=16)
    [old] = sim.add([1, 2, 3], max_tokens=40)
    [new] = sim.add([4, 5, 6], max_tokens=40)
    sim.step()
    preempted = []
    while not preempted:
        preempted = sim.step().preempted
    assert preempted == [new]
    assert new.num_output_tokens >= 1 and new.num_computed_tokens == 0
    assert sim.sched.waiting[0] is new
    tokens_before = list(new.token_ids)
    # Once readmitted it recomputes prompt + generated tokens before sampling anything new.
    while new.status is SequenceStatus.WAITING and not old.is_finished:
        sim.step()
    assert new.token_ids[: len(tokens_before)] == tokens_before
    sim.drain()
    assert new.num_preemptions >= 1


def test_preempting_an_already_scheduled_decode_unschedules_it():
    sim = SimEngine(ignore_eos=True, num_blocks=5, block_size=2, max_num_batched_tokens=4)
    [young] = sim.add([1, 2, 3], max_tokens=20, arrival_time=2.0)
    sim.step()  # young: 2 blocks
    [old] = sim.add(list(range(10, 20)), arrival_time=1.0)
    sim.step()  # young decodes, old admitted with a 3-token chunk (2 blocks)
    assert old.num_computed_tokens == 3 and young.num_computed_tokens == 4
    out = sim.step()  # young's decode takes the last block; old's chunk then needs one more: young is preempted
    assert out.preempted == [young]
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(old, 4)]  # young's budget given back
    assert out.num_batched_tokens == 4
    sim.drain()


def test_lone_sequence_that_outgrows_the_pool_finishes_with_length():
    sim = SimEngine(ignore_eos=True, num_blocks=2, block_size=4)
    [seq] = sim.add([1, 2, 3, 4, 5, 6], max_tokens=50)
    outs = [sim.step() for _ in range(4)]
    assert outs[-1].finished_for_capacity == [seq]
    assert seq.is_finished and seq.finish_reason == "length"
    assert seq.num_output_tokens == 3  # KV for 8 tokens: prompt 6 + 2 outputs, the 3rd output needs no KV
    assert seq.output_token_ids == expected_output(seq)[:3]
    sim.check_final()


def test_prompt_too_long_is_rejected_with_the_numbers():
    sim = SimEngine(ignore_eos=True, num_blocks=4, block_size=4, max_model_len=30)
    with pytest.raises(PromptTooLongError, match=r"20 tokens \+ max_tokens 11 = 31 exceeds max_model_len 30"):
        sim.add(list(range(20)), max_tokens=11)
    with pytest.raises(PromptTooLongError, match=r"17 tokens needs 5 KV blocks .* 4 blocks of 4 tokens \(16 tokens\)"):
        sim.add(list(range(17)), max_tokens=1)
    assert not sim.sched.has_unfinished()
    sim.add(list(range(16)), max_tokens=1)
    sim.drain()


def test_max_tokens_none_means_up_to_max_model_len():
    sim = SimEngine(ignore_eos=True, num_blocks=8, block_size=4, max_model_len=20)
    [seq] = sim.add(list(range(1, 13)), max_tokens=None)
    assert seq.max_tokens == 8
    sim.drain()
    assert seq.num_tokens == 20 and seq.finish_reason == "length"
    with pytest.raises(PromptTooLongError, match="20 tokens leaves no room to generate within max_model_len 20"):
        sim.add(list(range(1, 21)), max_tokens=None)


def test_abort_is_idempotent_and_frees_waiting_and_running():
    sim = SimEngine(ignore_eos=True, num_blocks=20, block_size=4, max_num_seqs=2)
    seqs = sim.add([1, 2, 3, 4, 5], n=3, max_tokens=30)
    sim.step()
    assert sim.sched.num_running == 2 and sim.sched.num_waiting == 1
    aborted = sim.sched.abort("r0")
    assert aborted == seqs and all(s.finish_reason == "abort" and s.is_finished for s in seqs)
    assert sim.sched.abort("r0") == [] and sim.sched.abort("nope") == []
    assert not sim.sched.has_unfinished() and sim.bm.num_free_blocks == 20
    sim.check_final()


def test_samples_of_a_request_share_the_prompt_blocks_once_computed():
    sim = SimEngine(ignore_eos=True, num_blocks=40, block_size=4, max_num_batched_tokens=14)
    a, b = sim.add(list(range(1, 10)) + ["imgA"], n=2, max_tokens=3)  # 14 tokens
    sim.step()  # the budget only covers a
    assert b.status is SequenceStatus.WAITING and not a.is_finished
    first_blocks = a.block_table[:3]
    sim.step()
    assert b.num_cached_tokens == 12 and b.block_table[:3] == first_blocks
    [c] = sim.add(list(range(1, 10)) + ["imgB"], max_tokens=2)  # other image, same placeholder ids
    sim.step()
    assert c.num_cached_tokens == 8 and c.block_table[:2] == first_blocks[:2]
    assert c.block_table[2] not in first_blocks
    sim.drain()
    assert sim.bm.prefix_cache_hits == 20


def test_finish_and_abort_between_schedule_and_step_done():
    sim = SimEngine(ignore_eos=True, num_blocks=20, block_size=4)
    sim.add([1, 2, 3], max_tokens=5)
    [other] = sim.add([4, 5, 6], max_tokens=5)
    sim.step(abort_mid_step="r0")
    assert other.num_computed_tokens == 3 and other.num_output_tokens == 1
    sim.drain()


# ---- random interleavings -------------------------------------------------------------------------------------------

SHARED_PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, "imgA"], [1, 2, 3, 4, "imgB"], ["imgC", 9, 9]]
part = st.one_of(st.integers(1, 6), st.sampled_from(list(IMAGE_LENGTHS)))


def ops_strategy(suffix, max_tokens):
    add_op = st.tuples(
        st.just("add"),
        st.integers(0, len(SHARED_PREFIXES)),  # len() = no shared prefix
        suffix,
        st.integers(1, 3),  # n
        max_tokens,
    )
    step_op = st.tuples(st.just("step"), st.integers(1, 6))
    abort_op = st.tuples(st.just("abort"), st.integers(0, 30), st.booleans())
    return st.lists(st.one_of(add_op, add_op, step_op, step_op, abort_op), min_size=4, max_size=30)


def run_ops(sim: SimEngine, ops, max_model_len: int) -> None:
    capacity = sim.bm.num_total_blocks * sim.bm.block_size
    for op in ops:
        if op[0] == "add":
            _, prefix_index, suffix, n, max_tokens = op
            prefix = SHARED_PREFIXES[prefix_index] if prefix_index < len(SHARED_PREFIXES) else []
            parts = prefix + suffix or [1]
            num_prompt = len(build_prompt(parts)[0])
            if num_prompt + max_tokens > max_model_len or num_prompt > capacity:
                with pytest.raises(PromptTooLongError):
                    sim.add(parts, n, max_tokens)
            else:
                sim.add(parts, n, max_tokens)
        elif op[0] == "step":
            for _ in range(op[1]):
                sim.step()
        else:
            _, index, mid_step = op
            request_id = f"r{index % max(sim.next_request, 1)}"
            if mid_step and sim.sched.has_unfinished():
                sim.step(abort_mid_step=request_id)
            else:
                live_before = [s for s in sim.live if s.request_id == request_id]
                assert sim.sched.abort(request_id) == live_before
                assert all(s.finish_reason == "abort" for s in live_before)
        sim.check()
    sim.drain()
    assert 0 <= sim.bm.prefix_cache_hits <= sim.bm.prefix_cache_queries
    # `pytest --hypothesis-show-statistics` tells how often the interesting paths ran.
    event(f"preempted: {any(o.preempted for o in sim.outputs)}")
    event(f"finished for capacity: {bool(sim.finished_for_capacity)}")
    event(f"prefix hits: {sim.bm.prefix_cache_hits > 0}")
    event(f"eviction: {sim.bm.num_evictions > 0}")
    event(f"chunked prefill: {sim.num_chunked > 0}")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(3, 20),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(1, 40),
    max_model_len=st.integers(24, 128),
    enable_prefix_caching=st.booleans(),
    ops=ops_strategy(st.lists(part, max_size=6), st.integers(1, 20)),
)
def test_random_interleavings(
    num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len, enable_prefix_caching, ops
):
    sim = SimEngine(num_blocks, block_size, max_num_seqs, max_num_batched_tokens, max_model_len, enable_prefix_caching)
    run_ops(sim, ops, max_model_len)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(4, 12),
    block_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(2, 6),
    max_num_batched_tokens=st.integers(4, 24),
    ignore_eos=st.booleans(),
    ops=ops_strategy(st.lists(st.integers(1, 6), max_size=3), st.integers(4, 24)),
)
def test_random_interleavings_under_memory_pressure(
    num_blocks, block_size, max_num_seqs, max_num_batched_tokens, ignore_eos, ops
):
    """Short prompts, long outputs, small pools: preemption, eviction and capacity finishes are common."""
    sim = SimEngine(num_blocks, block_size, max_num_seqs, max_num_batched_tokens, 10**6, True, ignore_eos)
    run_ops(sim, ops, 10**6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed_prompts=st.lists(st.lists(part, min_size=1, max_size=6), min_size=2, max_size=6))
def test_same_outputs_with_and_without_prefix_caching_and_preemption(seed_prompts):
    """Tight pools (preemption, eviction) and prefix caching change nothing in what is generated."""
    results = []
    for num_blocks, prefix in ((400, False), (26, True), (26, False)):
        sim = SimEngine(num_blocks, 2, max_num_seqs=6, max_num_batched_tokens=16, enable_prefix_caching=prefix)
        for parts in seed_prompts:
            sim.add([1, 2, 3] + parts, n=2, max_tokens=6)
        sim.drain()
        results.append([(s.request_id, s.sample_index, s.output_token_ids, s.finish_reason) for s in sim.all])
        event(f"{num_blocks} blocks, prefix caching {prefix}: preempted {any(o.preempted for o in sim.outputs)}")
    assert results[0] == results[1] == results[2]
