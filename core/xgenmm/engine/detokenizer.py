"""`IncrementalDetokenizer`: generated token ids -> streamed text deltas, with stop strings.

Text semantics: the output text is `tokenizer.decode(output_token_ids, skip_special_tokens=...)` (what HF's
`generate` + `decode` of the new tokens gives, and what the official demos print), cut at the first stop string.
`update` returns only text that is final: never half of a multi-byte character, never text that a later token could
still change, and never text that may be the start of a stop string (held until disambiguated). When the sequence
ends for any reason other than a stop string, call `flush()` (or pass `stop_terminated=True` to the last `update`)
to get the held-back rest; then the concatenation of all deltas equals the full decode (or its stop-string cut).

With `prompt_context=True` the output continues the prompt as vLLM's does (a first "▁word" keeps its space when the
prompt has visible text); the default is HF's decode of the output alone.
"""

from __future__ import annotations

from typing import Sequence

from .stop_matcher import StopMatcher
from .token_text import ByteFallbackDecoder, WindowDecoder, byte_fallback_table

__all__ = ["IncrementalDetokenizer", "StopStringBuffer"]

# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: prompt tokens used as context by the generic decoder.
_PROMPT_CONTEXT_TOKENS = 5


class StopStringBuffer:
    """Finds stop strings across chunk boundaries in a stream of final text and holds back possible beginnings.

    The stop string that is complete first in the text wins (earliest end; the longer one on a tie), which is what
    token-by-token checking gives and does not depend on how the text is chunked. One Aho-Corasick automaton
    (`StopMatcher`) reads each character once, so the work per push is O(len(chunk)) whatever the number of stop
    strings.
    """

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include = include_stop_str_in_output
        self._matcher = StopMatcher(self.stop) if self.stop else None
        self._pending = ""  # final text not released yet (could begin a stop string)
        self.stop_reason: str | None = None

    def push(self, text: str, final: bool = False) -> str:
        """Add final text; return the part that can be released. Sets `stop_reason` when a stop string is found."""
        if self.stop_reason is not None:
            return ""
        if self._matcher is None:
            return self._pending_out(text)
        fresh = self._pending + text
        found = self._matcher.feed(text)
        if found is not None:
            end, self.stop_reason = found
            end += len(self._pending)  # index into `fresh` just past the stop string
            cut = end if self.include else end - len(self.stop_reason)
            self._pending = ""
            return fresh[:max(0, cut)]
        # Held back: the longest suffix that may still become a stop string (never reaches into released text,
        # since that text was released only when no stop string could start in it).
        keep = 0 if (final or self.include) else min(self._matcher.depth, len(fresh))
        released, self._pending = fresh[: len(fresh) - keep], fresh[len(fresh) - keep :]
        return released

    def _pending_out(self, text: str) -> str:
        out, self._pending = self._pending + text, ""
        return out


class IncrementalDetokenizer:
    """Streams the text of one generated sequence (see the module docstring for the exact semantics).

    Attributes: `text` (cumulative released text), `finished` (a stop string was found, or the sequence was
    flushed), `stop_reason` (the stop string that matched, else None).
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        *,
        prompt_context: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str_in_output = include_stop_str_in_output
        table = byte_fallback_table(tokenizer)
        if table is not None:
            strip = True
            if prompt_context:
                visible = [
                    t for t in prompt_token_ids
                    if 0 <= t < len(table.pieces) and not (skip_special_tokens and table.special[t])
                ]
                strip = not visible
            self._decoder: ByteFallbackDecoder | WindowDecoder = ByteFallbackDecoder(table, skip_special_tokens, strip)
        else:
            context = list(prompt_token_ids)[-_PROMPT_CONTEXT_TOKENS:] if prompt_context else []
            self._decoder = WindowDecoder(tokenizer, skip_special_tokens, context)
        self._stops = StopStringBuffer(stop, include_stop_str_in_output)
        self._parts: list[str] = []
        self._text = ""
        self.finished = False
        self.num_tokens = 0

    @property
    def is_fast_path(self) -> bool:
        return isinstance(self._decoder, ByteFallbackDecoder)

    @property
    def text(self) -> str:
        """All text released so far."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

    @property
    def stop_reason(self) -> str | None:
        return self._stops.stop_reason

    def update(self, new_token_ids: Sequence[int], stop_terminated: bool = False) -> str:
        """Feed newly generated ids; return the newly final text.

        `stop_terminated=True` says the last id is the stop token that ended the sequence (EOS or one of
        stop_token_ids): its text is left out unless include_stop_str_in_output (vLLM), and the held-back rest is
        flushed. After a stop string was found, further updates return "".
        """
        if self.finished:
            return ""
        ids = list(new_token_ids)
        self.num_tokens += len(ids)
        if stop_terminated and ids and not self.include_stop_str_in_output:
            ids = ids[:-1]
        delta = self._emit(self._decoder.feed(ids))
        if stop_terminated and not self.finished:
            delta += self.flush()
        return delta

    def flush(self) -> str:
        """End of sequence: release everything held back (an unfinished byte run renders as decode() does)."""
        if self.finished:
            return ""
        delta = self._emit(self._decoder.flush(), final=True)
        self.finished = True
        return delta

    def _emit(self, chunk: str, final: bool = False) -> str:
        released = self._stops.push(chunk, final=final)
        if self._stops.stop_reason is not None:
            self.finished = True
        if released:
            self._parts.append(released)
        return released
