"""Per-sample generation state shared by the scheduler, the block manager and the engine.

A `Sequence` is one sample (index `sample_index` of a request's `n`). Its `token_ids` are the FUSED prompt: text ids
with every image's vision positions filled with the placeholder id (32012), followed by the generated ids. The token
list only ever grows at the end, which is what lets `block_hashes` cache the hash of each full block once.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Iterable

from xgenmm.errors import PromptError
from xgenmm.multimodal.spans import ImageSpan


_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """Mutable state of one sample. Plain attributes on purpose: the engine reads and writes them directly."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        *,
        image_spans: Iterable[ImageSpan] = (),
        sample_index: int = 0,
        max_tokens: int | None = 16,
        arrival_time: float | None = None,
    ) -> None:
        token_ids = list(prompt_token_ids)
        if not token_ids:
            raise PromptError(f"request {request_id!r}: the prompt has no tokens")
        if max_tokens is not None and max_tokens < 1:
            raise PromptError(f"request {request_id!r}: max_tokens must be >= 1, got {max_tokens}")
        spans = tuple(sorted(image_spans, key=lambda s: s.start))
        previous_end = 0
        for span in spans:
            if span.length < 1 or span.start < previous_end or span.end > len(token_ids):
                raise PromptError(
                    f"request {request_id!r}: image span {span} is empty, overlaps another span or lies outside "
                    f"the {len(token_ids)}-token prompt"
                )
            previous_end = span.end

        self.seq_id: int = next(_seq_counter)
        self.request_id = request_id
        self.sample_index = sample_index
        self.token_ids: list[int] = token_ids
        self.num_prompt_tokens: int = len(token_ids)
        self.image_spans: tuple[ImageSpan, ...] = spans
        self.max_tokens = max_tokens  # None = up to max_model_len (Scheduler.add resolves it to an int)
        self.arrival_time: float = time.monotonic() if arrival_time is None else arrival_time

        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at the latest admission
        self.block_table: list[int] = []
        self.finish_reason: str | None = None  # set by whoever finishes it ("stop", "length", "abort", ...)
        self.num_preemptions = 0

        # Prefix-cache bookkeeping owned by the BlockManager.
        self.block_hashes: list[bytes] = []  # hash of full block i (valid forever: tokens only grow at the end)
        self.num_registered_blocks = 0  # leading blocks of block_table already offered to the prefix cache

    # ---- derived state -------------------------------------------------------------------------------------------
    @property
    def priority(self) -> tuple[float, int]:
        """FCFS key: earlier arrival first; seq_id (creation order) breaks ties."""
        return (self.arrival_time, self.seq_id)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, sample={self.sample_index}, "
            f"status={self.status.name}, tokens={self.num_tokens} (prompt {self.num_prompt_tokens}), "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
