"""`GrammarMatcher`: the per-sequence grammar state that masks the next token and follows the sampled ones.

Life cycle, one matcher per sequence: `fill_bitmask` before sampling, `accept_token` with the sampled token. When the
output is complete the grammar allows only EOS (`<|end|>`); `is_stopped()` says so (an engine may finish right there)
and accepting the EOS makes `is_terminated()` true. A matcher that was fed a disallowed token enters an error state
(`error` is set) and from then on allows only EOS, so the sequence ends instead of producing garbage.
"""

from __future__ import annotations

import llguidance
import torch

from .bitmask import clear_tokens

__all__ = ["GrammarMatcher", "fill_bitmasks"]


class GrammarMatcher:
    """Wraps an `llguidance.LLMatcher` with the engine's conventions (EOS handling, forbidden VLM tokens)."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_id: int, vocab_size: int, forbidden_token_ids=()) -> None:
        self._matcher = matcher
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self.forbidden_token_ids = tuple(forbidden_token_ids)
        self._terminated = False
        self._num_accepted = 0
        self._forced_error: str | None = None

    # -- masking ---------------------------------------------------------------------------------------------

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed next tokens into `bitmask[row]` (CPU int32 [B, ceil(V/32)], contiguous rows)."""
        target = bitmask[row]
        if self.is_terminated():
            self._only_eos(target)
            return
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())
        self.finish_bitmask_row(target)

    def finish_bitmask_row(self, target: torch.Tensor) -> None:
        """Post-process a row llguidance filled (also after a batched fill): never allow the VLM tokens."""
        if self.is_terminated():
            self._only_eos(target)
        else:
            clear_tokens(target, self.forbidden_token_ids)

    def _only_eos(self, target: torch.Tensor) -> None:
        target.zero_()
        word, bit = divmod(self.eos_token_id, 32)
        target[word] = (1 << bit) if bit < 31 else -(2**31)

    # -- advancing -------------------------------------------------------------------------------------------

    def accept_token(self, token_id: int) -> bool:
        """Advance over a sampled token. Returns False (and enters the error state) if the grammar forbids it."""
        token_id = int(token_id)
        if self.is_terminated():
            return self._forced_error is None and not self._matcher.is_error() and token_id == self.eos_token_id
        if token_id in self.forbidden_token_ids:
            self._forced_error = f"token {token_id} (a VLM special token) is not allowed by a grammar"
            return False
        ok = self._matcher.consume_token(token_id)
        if ok:
            self._num_accepted += 1
            if token_id == self.eos_token_id:
                self._terminated = True
        return ok

    def accept_tokens(self, token_ids) -> bool:
        """Advance over several tokens; stops at (and returns False for) the first one the grammar forbids."""
        return all(self.accept_token(t) for t in token_ids)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (cheap in llguidance; used by preemption / speculation)."""
        if num_tokens <= 0:
            return
        if num_tokens > self._num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} tokens, only {self._num_accepted} were accepted")
        if not self._matcher.rollback(num_tokens):
            raise RuntimeError(f"llguidance could not roll back {num_tokens} tokens: {self._matcher.get_error()}")
        self._num_accepted -= num_tokens
        self._terminated = False

    def reset(self) -> None:
        """Back to the start of the grammar (e.g. a sequence preempted and recomputed from scratch)."""
        self._matcher.reset()
        self._terminated = False
        self._num_accepted = 0
        self._forced_error = None

    # -- state -----------------------------------------------------------------------------------------------

    def is_terminated(self) -> bool:
        """True once EOS was accepted (or the matcher failed): nothing but EOS can follow."""
        return self._terminated or self._forced_error is not None or self._matcher.is_error()

    def is_stopped(self) -> bool:
        """True when the output is complete: no token but EOS can extend it (the engine may finish now)."""
        return self.is_terminated() or self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """True when the text so far is a complete match (EOS is allowed now)."""
        return self._terminated or self._matcher.is_accepting()

    @property
    def num_accepted_tokens(self) -> int:
        return self._num_accepted

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a disallowed token was fed), or None."""
        if self._forced_error is not None:
            return self._forced_error
        if self._matcher.is_error():
            return self._matcher.get_error().split("\n<state>")[0].strip() or "grammar error"
        return None

    @property
    def ll_matcher(self) -> llguidance.LLMatcher:
        """The underlying llguidance matcher (for batched mask filling with an `LLExecutor`)."""
        return self._matcher


_EXECUTOR: llguidance.LLExecutor | None = None


def _executor() -> llguidance.LLExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


def fill_bitmasks(matchers: list[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
    """Fill `bitmask[row]` for every (matcher, row), computing the masks in parallel (llguidance's thread pool,
    GIL released) when there are several. `bitmask` is a contiguous CPU int32 [B, words] tensor."""
    if not matchers:
        return
    live = [(m, row) for m, row in matchers if not m.is_terminated()]
    if len(live) > 1:
        if not bitmask.is_contiguous():
            raise ValueError("bitmask must be contiguous")
        ex = _executor()
        ex.unsafe_compute_mask_ptr(
            [(m.ll_matcher, row) for m, row in live], bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
        )
        for m, row in matchers:
            if m.is_terminated():
                m.fill_bitmask(bitmask, row)
            else:
                m.finish_bitmask_row(bitmask[row])
        return
    for m, row in matchers:
        m.fill_bitmask(bitmask, row)
