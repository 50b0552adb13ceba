"""Repetition / presence / frequency penalties, vectorised over the batch.

Token counts live in a device-resident pool with one row ("slot") per sequence that uses penalties, updated with
only the tokens generated since the previous step, so a step costs O(batch + new tokens) host work and a few kernels,
never a rebuild from the Python token lists.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

__all__ = ["PenaltySlot", "PenalisedSequence", "TokenCountPool", "apply_penalties"]


@dataclass
class PenaltySlot:
    """A sequence's row in a `TokenCountPool`: which pool, which row, how many output tokens are counted in it."""

    pool: "TokenCountPool"
    index: int
    counted: int
    finalizer: weakref.finalize


class PenalisedSequence(Protocol):
    """What the pool reads of a sequence's sampling state (`xgenmm.engine.sampler.SamplingState`)."""

    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    repetition_penalty_over_prompt: bool
    penalty_slot: PenaltySlot | None


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
) -> torch.Tensor:
    """Penalised copy of `logits` [R, V].

    Repetition penalty (HF / vLLM semantics) over every token seen in the prompt or the output: positive logits are
    divided by the penalty, negative ones multiplied. Presence / frequency penalties (OpenAI semantics) over output
    tokens only: `logit - frequency * count - presence * (count > 0)`.
    """
    output_seen = output_counts > 0
    seen = prompt_mask | output_seen
    rep = repetition_penalties.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    counts = output_counts.to(logits.dtype)
    return logits - frequency_penalties.unsqueeze(1) * counts - presence_penalties.unsqueeze(1) * output_seen.to(logits.dtype)


class TokenCountPool:
    """Per-sequence prompt-token masks (bool) and output-token counts (int32) in [slots, V] device tensors.

    A sequence gets a slot on first use; the slot returns to the free list when `release` is called or the
    `SamplingState` is garbage-collected.
    """

    def __init__(self, vocab_size: int, device: torch.device, initial_slots: int = 8) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.prompt_mask = torch.zeros((initial_slots, vocab_size), dtype=torch.bool, device=self.device)
        self.counts = torch.zeros((initial_slots, vocab_size), dtype=torch.int32, device=self.device)
        self._free = list(range(initial_slots - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def num_slots(self) -> int:
        return self.counts.shape[0]

    def _grow(self) -> None:
        old = self.num_slots
        new = old * 2
        self.prompt_mask = torch.cat([self.prompt_mask, torch.zeros_like(self.prompt_mask)])
        self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        self._free.extend(range(new - 1, old - 1, -1))

    def _free_slot(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def release(self, state: PenalisedSequence) -> None:
        """Give the state's row back (idempotent)."""
        slot = state.penalty_slot
        if slot is not None and slot.pool is self:
            slot.finalizer()  # calls _free_slot once
        state.penalty_slot = None

    def slots_for(self, states: Sequence[PenalisedSequence]) -> torch.Tensor:
        """Row indices (on the pool's device) for `states`, after counting their new output tokens."""
        rows: list[int] = []
        new_rows: list[int] = []
        new_tokens: list[int] = []
        for state in states:
            slot = state.penalty_slot
            if slot is None or slot.pool is not self:
                slot = self._assign(state)
            outputs = state.output_token_ids
            if len(outputs) < slot.counted:  # the output was rewritten: count from scratch
                self.counts[slot.index].zero_()
                slot.counted = 0
            if len(outputs) > slot.counted:
                fresh = outputs[slot.counted:]
                new_rows.extend([slot.index] * len(fresh))
                new_tokens.extend(fresh)
                slot.counted = len(outputs)
            rows.append(slot.index)
        if new_tokens:
            index = torch.tensor([new_rows, new_tokens], dtype=torch.long).to(self.device, non_blocking=True)
            ones = torch.ones(len(new_tokens), dtype=torch.int32, device=self.device)
            self.counts.index_put_((index[0], index[1]), ones, accumulate=True)
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def _assign(self, state: PenalisedSequence) -> PenaltySlot:
        if state.penalty_slot is not None:  # moved to another pool (another device / sampler)
            state.penalty_slot.pool.release(state)
        with self._lock:
            if not self._free:
                self._grow()
            index = self._free.pop()
        self.counts[index].zero_()
        self.prompt_mask[index].zero_()
        prompt = [t for t in state.prompt_token_ids if 0 <= t < self.vocab_size] if state.repetition_penalty_over_prompt else []
        if prompt:
            self.prompt_mask[index, torch.tensor(prompt, dtype=torch.long).to(self.device)] = True
        slot = PenaltySlot(self, index, 0, weakref.finalize(state, self._free_slot, index))
        state.penalty_slot = slot
        return slot
