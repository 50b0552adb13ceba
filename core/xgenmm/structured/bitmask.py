"""Token bitmasks: one bit per vocabulary entry, 32 per int32 word (llguidance's layout, bit i%32 of word i//32).

llguidance fills the masks on the CPU; `apply_token_bitmask` turns them into a boolean allow-mask on the logits'
device with plain tensor ops (no torch.compile: llguidance.torch's helper compiles on first use, which costs tens of
seconds on a CPU and is not needed for a [B, 32015] tensor).
"""

from __future__ import annotations

import torch

__all__ = ["bitmask_words", "allocate_token_bitmask", "bitmask_to_allowed", "apply_token_bitmask", "clear_tokens"]


def bitmask_words(vocab_size: int) -> int:
    """Number of int32 words that hold one bit per token of `vocab_size`."""
    return (vocab_size + 31) // 32


def allocate_token_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 [batch_size, words] mask with every token allowed (all bits set), as llguidance expects."""
    return torch.full((batch_size, bitmask_words(vocab_size)), -1, dtype=torch.int32)


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _bit_shifts(device: torch.device) -> torch.Tensor:
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return shifts


def bitmask_to_allowed(bitmask: torch.Tensor, vocab_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Unpack an int32 [R, words] bitmask into a bool [R, vocab_size] tensor (True = allowed) on `device`."""
    device = torch.device(device) if device is not None else bitmask.device
    words = bitmask.to(device, non_blocking=True)
    bits = (words.unsqueeze(-1) >> _bit_shifts(device)) & 1  # arithmetic shift; & 1 keeps the bit
    return bits.view(words.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | torch.Tensor | None = None) -> None:
    """Set logits of disallowed tokens to -inf in place. `bitmask` has one row per entry of `rows` (all rows if
    None); tokens past the mask's width are disallowed."""
    vocab = logits.shape[-1]
    allowed = bitmask_to_allowed(bitmask, min(vocab, bitmask.shape[-1] * 32), logits.device)
    if allowed.shape[-1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[-1]), value=False)
    if rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = torch.as_tensor(rows, dtype=torch.long).to(logits.device)
    # index_select / index_copy_: advanced indexing (logits[index]) is ~100x slower on CPU
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill(~allowed, float("-inf")))


def clear_tokens(bitmask_row: torch.Tensor, token_ids) -> None:
    """Disallow `token_ids` in one bitmask row (int32 [words]) in place."""
    for tid in token_ids:
        word, bit = divmod(int(tid), 32)
        if word < bitmask_row.shape[0]:
            # int32 arithmetic: ~(1 << 31) is 0x7fffffff, as required
            bitmask_row[word] &= ~(1 << bit) if bit < 31 else 0x7FFFFFFF
