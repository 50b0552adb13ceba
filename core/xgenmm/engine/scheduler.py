"""Continuous batching in the vLLM V1 style: one token budget per step, no prefill/decode phases.

Every sequence has `num_computed_tokens` against `num_tokens`; each step hands out up to `max_num_batched_tokens`:

1. RUNNING decodes (1 token left to compute), oldest first, so a long prefill never stalls them;
2. RUNNING sequences still prefilling, oldest first, a chunk of `min(remaining, budget)` each;
3. WAITING sequences, strictly first-come-first-served (preempted ones are at the front): prefix-cache hits, then a
   first chunk. The head of the queue is never skipped: if it cannot get its first chunk's blocks, nobody behind it
   is admitted this step. Nothing is admitted in a step that had to preempt.

When a running sequence cannot get a block, the most recently arrived running sequence is preempted by recompute
(blocks freed, `num_computed_tokens = 0`, back to the front of the waiting queue; its `token_ids` keep the generated
tokens, which are recomputed) and the allocation is retried; that may preempt the sequence itself. A sequence that
is alone (nobody else holds blocks) gets a smaller chunk if that fits, and is finished with reason "length"
(`finished_for_capacity`) when not even one more token fits in the whole pool.

Engine contract per step:
    out = scheduler.schedule()
    ... run the model on out.scheduled (context = seq.num_computed_tokens, new = num_new_tokens) ...
    ready = scheduler.on_step_done(out)     # advances num_computed_tokens, registers full blocks
    for seq in ready: seq.append_token(t) or (seq.append_token(t); scheduler.finish(seq, "stop"))
A RUNNING sequence whose tokens are all computed must get a token appended (or be finished) before the next step.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from xgenmm.engine.block_manager import BlockManager
from xgenmm.engine.sequence import Sequence, SequenceStatus
from xgenmm.errors import ConfigError, PromptTooLongError


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    # Order: running decodes, running prefill chunks, newly admitted sequences.
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    # Finished (status FINISHED, finish_reason "length") because they cannot grow in the whole KV pool.
    finished_for_capacity: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 4096,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 1:
            raise ConfigError(
                f"max_num_seqs ({max_num_seqs}), max_num_batched_tokens ({max_num_batched_tokens}) and "
                f"max_model_len ({max_model_len}) must all be >= 1"
            )
        self.block_manager = block_manager
        # Every running decode must fit in one step's budget, else decodes could starve each other.
        self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by Sequence.priority (oldest first)
        self._by_request: dict[str, list[Sequence]] = {}

    # ---- queue state ---------------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get_sequences(self, request_id: str) -> list[Sequence]:
        """Unfinished sequences of a request."""
        return list(self._by_request.get(request_id, ()))

    # ---- requests in and out -------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; PromptTooLongError if it can never be served."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"only a fresh WAITING sequence can be added, got {seq}")
        if any(s is seq for s in self._by_request.get(seq.request_id, ())):
            raise ValueError(f"{seq} was already added")
        if seq.max_tokens is None:  # vLLM: generate until the context is full
            seq.max_tokens = self.max_model_len - seq.num_prompt_tokens
            if seq.max_tokens < 1:
                raise PromptTooLongError(
                    f"request {seq.request_id!r}: prompt of {seq.num_prompt_tokens} tokens leaves no room to "
                    f"generate within max_model_len {self.max_model_len}"
                )
        if seq.num_prompt_tokens + seq.max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"request {seq.request_id!r}: prompt of {seq.num_prompt_tokens} tokens + max_tokens "
                f"{seq.max_tokens} = {seq.num_prompt_tokens + seq.max_tokens} exceeds max_model_len "
                f"{self.max_model_len}"
            )
        bm = self.block_manager
        capacity = bm.num_total_blocks * bm.block_size
        if seq.num_prompt_tokens > capacity:
            raise PromptTooLongError(
                f"request {seq.request_id!r}: prompt of {seq.num_prompt_tokens} tokens needs "
                f"{bm.num_blocks_for(seq.num_prompt_tokens)} KV blocks but the whole cache has "
                f"{bm.num_total_blocks} blocks of {bm.block_size} tokens ({capacity} tokens)"
            )
        self.waiting.append(seq)
        self._by_request.setdefault(seq.request_id, []).append(seq)

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """Mark seq FINISHED, free its blocks and drop it from the queues (idempotent)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        queue = self.running if seq.status is SequenceStatus.RUNNING else self.waiting
        if seq in queue:  # (a sequence rejected by add() is in neither)
            queue.remove(seq)
        seq.status = SequenceStatus.FINISHED
        if reason is not None:
            seq.finish_reason = reason
        self.block_manager.free(seq)
        siblings = self._by_request.get(seq.request_id)
        if siblings is not None:
            siblings[:] = [s for s in siblings if s is not seq]
            if not siblings:
                del self._by_request[seq.request_id]

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of the request with reason "abort"; returns them ([] if none)."""
        seqs = self.get_sequences(request_id)
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    # ---- scheduling ----------------------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _finish_for_capacity(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.finish(seq, "length")
        out.finished_for_capacity.append(seq)

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        out = SchedulerOutput()
        chosen: dict[int, ScheduledSequence] = {}  # seq_id -> entry, in scheduling order
        budget = self.max_num_batched_tokens

        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            while True:
                num_new = min(seq.num_uncomputed_tokens, budget)
                allocated = bm.allocate_slots(seq, num_new)
                if not allocated and len(self.running) == 1:
                    # Alone, so the whole pool is free for it: a smaller chunk, or it outgrew the pool.
                    num_new = min(num_new, bm.max_schedulable_tokens(seq))
                    allocated = num_new > 0 and bm.allocate_slots(seq, num_new)
                    if not allocated:
                        self._finish_for_capacity(seq, out)
                        break
                if allocated:
                    chosen[seq.seq_id] = ScheduledSequence(seq, num_new)
                    budget -= num_new
                    break
                victim = self.running[-1]  # most recently arrived
                self._preempt(victim)
                out.preempted.append(victim)
                undone = chosen.pop(victim.seq_id, None)
                if undone is not None:  # it was scheduled earlier in this loop: give its tokens back
                    budget += undone.num_new_tokens
                if victim is seq:
                    break

        if not out.preempted:
            self._admit_waiting(out, chosen, budget)

        out.scheduled = list(chosen.values())
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _admit_waiting(self, out: SchedulerOutput, chosen: dict[int, ScheduledSequence], budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = bm.match_prefix(seq)
            num_new = min(seq.num_tokens - len(prefix) * bm.block_size, budget)
            if not bm.can_admit(seq, num_new, prefix):
                if self.running:
                    return  # head of line waits for blocks; FCFS: nobody overtakes it
                # Nobody holds blocks: shrink the chunk to the pool, or give up on a sequence that outgrew it.
                num_new = min(num_new, bm.max_schedulable_tokens(seq, prefix))
                if num_new == 0:
                    self._finish_for_capacity(seq, out)
                    continue
            self.waiting.popleft()
            bm.allocate_prefix(seq)
            allocated = bm.allocate_slots(seq, num_new)
            assert allocated, "can_admit promised these blocks"
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.priority)
            chosen[seq.seq_id] = ScheduledSequence(seq, num_new)
            budget -= num_new

    def on_step_done(self, output: SchedulerOutput) -> list[Sequence]:
        """Advance num_computed_tokens of the scheduled sequences and register their full blocks.

        Returns the sequences whose tokens are now all computed: the engine samples one token for each. Sequences
        finished or aborted since `schedule()` are skipped.
        """
        ready: list[Sequence] = []
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += item.num_new_tokens
            assert seq.num_computed_tokens <= seq.num_tokens, f"{seq} computed past its tokens"
            self.block_manager.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                ready.append(seq)
        return ready
