"""Upstream's prompt tokenization, exactly: the slow sentencepiece `LlamaTokenizer(legacy=False)`, at fast speed.

The official demos, LAVIS and VLMEvalKit load `AutoTokenizer.from_pretrained(repo, use_fast=False, legacy=False)`
(the slow sentencepiece tokenizer of transformers 4.4x), add the three VLM tokens as additional special tokens, set
the eos token to `<|end|>` and tokenize the *whole* prompt string at once. That tokenizer does, in order:

1. replace every "▁" in the text by " ", then put one "▁" in front of the whole text (`add_prefix_space`);
2. split the text on every added token, leftmost first (Phi-3's added tokens never overlap, so "longest first"
   never has to choose); an added token with `rstrip` eats the whitespace after it (Python's `str.lstrip()`, so
   also "\\x1c".."\\x1f"), one with `lstrip` the whitespace before it; empty chunks disappear;
3. encode each text chunk with the sentencepiece BPE model *without* a dummy prefix (spaces become "▁");
4. drop the leading "▁" token when the token after it is a *special* token (bos, eos, unk, pad and the additional
   special tokens). The role tags `<|system|>`, `<|user|>`, ... are added tokens but not special ones, so a prompt
   that starts with `<|system|>` starts with "▁" (29871), while one that starts with `<image>` does not.

Step 3 runs in the `tokenizers` library on the checkpoint's own BPE model (tokenizer.json's vocabulary and merges),
with spaces mapped to "▁" and nothing else, over all the chunks of a batch in one call. The transformers converter
builds those merges from the sentencepiece scores so that the two BPEs agree; the golden tests check it against the
slow tokenizer on a real sentencepiece model.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["AddedTokenRule", "PromptEncoding", "SlowLlamaPromptEncoder", "SPIECE_UNDERLINE"]


def _inside(spans: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether [start, end) lies within one of the sorted, non-overlapping `spans`."""
    index = bisect.bisect_right(spans, (start, float("inf"))) - 1
    return index >= 0 and spans[index][0] <= start and end <= spans[index][1]

SPIECE_UNDERLINE = "\u2581"


@dataclass(frozen=True)
class AddedTokenRule:
    """One added token as the slow tokenizer splits on it."""

    content: str
    token_id: int
    lstrip: bool = False
    rstrip: bool = False


@dataclass(frozen=True)
class PromptEncoding:
    """Token ids and, when asked for, their pieces and (start, end) character offsets into the original text
    ((0, 0) for the "▁" the tokenizer adds in front)."""

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]


class SlowLlamaPromptEncoder:
    """Encodes text exactly as the slow `LlamaTokenizer(legacy=False)` does (see the module docstring).

    `bpe` is a `tokenizers.Tokenizer` holding only the BPE model (see `from_backend`); `added_tokens` are every added
    token of the tokenizer (ids 0-2 and 32000+ for Phi-3); `special_tokens` is the slow tokenizer's
    `all_special_tokens`, which decides step 4.
    """

    def __init__(
        self,
        bpe,
        added_tokens: Iterable[AddedTokenRule],
        special_tokens: Iterable[str],
        add_prefix_space: bool = True,
    ) -> None:
        self._bpe = bpe
        self._rules = {rule.content: rule for rule in added_tokens if rule.content}
        self._special = frozenset(special_tokens)
        self._add_prefix_space = add_prefix_space
        # Longest first, so that at one position the longest added token wins (the slow tokenizer's trie does too).
        contents = sorted(self._rules, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(c) for c in contents)) if contents else None
        self._marker_id = bpe.token_to_id(SPIECE_UNDERLINE)
        self._model = bpe.model

    @classmethod
    def from_backend(cls, backend_tokenizer, added_tokens, special_tokens, add_prefix_space: bool = True):
        """Build from an HF fast tokenizer's backend (`tokenizers.Tokenizer`): its BPE model only, with a plain
        " " -> "▁" normalizer, no pre-tokenizer, no added tokens, no post-processor."""
        from tokenizers import Tokenizer

        spec = json.loads(backend_tokenizer.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"the slow Llama tokenization needs a BPE model, this tokenizer has {model.get('type')!r}")
        spec.update(
            added_tokens=[],
            normalizer={"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE},
            pre_tokenizer=None,
            post_processor=None,
            decoder=None,
            truncation=None,
            padding=None,
        )
        return cls(Tokenizer.from_str(json.dumps(spec)), added_tokens, special_tokens, add_prefix_space)

    # ---- public ----------------------------------------------------------------------------------------------------
    def encode(self, text: str, split_added_tokens: bool = True, with_details: bool = True,
               tag_spans: Sequence[tuple[int, int]] | None = None) -> PromptEncoding:
        return self.encode_batch([text], split_added_tokens, with_details,
                                 None if tag_spans is None else [tag_spans])[0]

    def encode_batch(
        self, texts: Sequence[str], split_added_tokens: bool = True, with_details: bool = False,
        tag_spans: Sequence[Sequence[tuple[int, int]] | None] | None = None,
    ) -> list[PromptEncoding]:
        """Encode each text. `split_added_tokens=False` is the slow tokenizer's `split_special_tokens=True`: no
        added token is recognised, the whole text is one chunk. `tag_spans` (per text, (start, end) character
        ranges): only added tokens lying inside one of them are recognised, every other occurrence is plain text
        (the chat template marks the control tokens it wrote itself, so content cannot forge them). Token strings
        and offsets are filled only with `with_details` (they cost more than the ids); otherwise both lists are
        empty."""
        prepared: list[list[tuple[int, int, AddedTokenRule | None]]] = []
        chunk_texts: list[str] = []
        spans_per_text = tag_spans if tag_spans is not None else [None] * len(texts)
        for text, spans in zip(texts, spans_per_text):
            if not isinstance(text, str):
                raise TypeError(f"expected text (str), got {type(text).__name__}")
            if not text:
                prepared.append([])
                continue
            transformed = text.replace(SPIECE_UNDERLINE, " ")
            if self._add_prefix_space:
                transformed = SPIECE_UNDERLINE + transformed
            if not split_added_tokens:
                chunks = [(0, len(transformed), None)]
            else:
                shift = 1 if self._add_prefix_space else 0
                allowed = None if spans is None else sorted((a + shift, b + shift) for a, b in spans)
                chunks = self._split(transformed, allowed)
            prepared.append(chunks)
            chunk_texts.extend(transformed[a:b] for a, b, rule in chunks if rule is None)
        if with_details:
            encoded = iter([(e.ids, e.tokens, e.offsets) for e in self._bpe.encode_batch(chunk_texts, add_special_tokens=False)])
        else:
            # The BPE model directly (the normalizer is " " -> "▁" only): no Encoding objects, no thread pool; for
            # prompt-sized inputs this is several times faster than `encode_batch`.
            tokenize = self._model.tokenize
            encoded = iter([([t.id for t in tokenize(c.replace(" ", SPIECE_UNDERLINE))], (), ()) for c in chunk_texts])
        return [self._assemble(chunks, encoded, with_details) for chunks in prepared]

    # ---- internals -------------------------------------------------------------------------------------------------
    def _assemble(self, chunks, encoded, with_details: bool) -> PromptEncoding:
        ids: list[int] = []
        tokens: list[str] = []
        offsets: list[tuple[int, int]] = []
        shift = 1 if self._add_prefix_space else 0
        first_is_marker = False
        for index, (start, end, rule) in enumerate(chunks):
            if rule is not None:
                ids.append(rule.token_id)
                if with_details:
                    tokens.append(rule.content)
                    offsets.append((start - shift, end - shift))
                continue
            chunk_ids, chunk_tokens, chunk_offsets = next(encoded)
            if index == 0:
                first_is_marker = len(chunk_ids) >= 1 and chunk_ids[0] == self._marker_id
            ids.extend(chunk_ids)
            if with_details:
                tokens.extend(chunk_tokens)
                offsets.extend((max(start + a - shift, 0), max(start + b - shift, 0)) for a, b in chunk_offsets)
        # Step 4: the leading "▁" goes when the next token is a special one (then the next token is an added token).
        if first_is_marker and len(ids) > 1 and len(chunks) > 1 and chunks[0][1] - chunks[0][0] == 1 \
                and chunks[1][2] is not None and chunks[1][2].content in self._special:
            ids, tokens, offsets = ids[1:], tokens[1:], offsets[1:]
        return PromptEncoding(ids, tokens, offsets)

    def _split(self, text: str, allowed: list[tuple[int, int]] | None = None) -> list[tuple[int, int, AddedTokenRule | None]]:
        """Step 2: (start, end, rule) of added tokens and text chunks (rule None) in order, strip rules applied,
        empty text chunks removed. With `allowed` (sorted spans), a match outside them stays text."""
        if self._pattern is None:
            return [(0, len(text), None)]
        parts: list[list] = []  # [start, end, rule]
        pos = 0
        rules = self._rules
        for match in self._pattern.finditer(text):
            begin = match.start()
            if allowed is not None and not _inside(allowed, begin, match.end()):
                continue
            if begin > pos:
                parts.append([pos, begin, None])
            parts.append([begin, match.end(), rules[match.group()]])
            pos = match.end()
        if pos < len(text):
            parts.append([pos, len(text), None])
        last = len(parts) - 1
        for i, part in enumerate(parts):
            rule = part[2]
            if rule is None:
                continue
            if rule.rstrip and i < last and parts[i + 1][2] is None:
                right = parts[i + 1]
                segment = text[right[0]:right[1]]
                right[0] += len(segment) - len(segment.lstrip())
            if rule.lstrip and i > 0 and parts[i - 1][2] is None:
                left = parts[i - 1]
                segment = text[left[0]:left[1]]
                left[1] -= len(segment) - len(segment.rstrip())
        return [(a, b, r) for a, b, r in parts if r is not None or b > a]
