"""Incremental token -> text decoders that only ever emit FINAL text (text no later token can change).

Two implementations behind one interface (`feed(ids) -> str`, `flush() -> str`):

* `ByteFallbackDecoder`: the fast path for sentencepiece-style tokenizers whose tokenizer.json decoder is
  Replace("▁" -> " "), ByteFallback, Fuse[, Strip(" ", start=k, stop=0)] (Phi-3 / Llama). O(1) per token with
  per-id lookup tables. It reproduces `tokenizer.decode` exactly, including ByteFallback's rule that a run of byte
  pieces is decoded as one unit (valid UTF-8 -> its text, invalid -> one U+FFFD per byte): a byte run is therefore
  held back until a non-byte piece ends it (or `flush`), since a later byte could still invalidate it. With
  skip_special_tokens, skipped tokens are invisible (a byte run continues across them), as in `decode`.
* `WindowDecoder`: the generic fallback (vLLM's prefix/read offsets): decodes a short window of recent tokens and
  holds back while the decoded tail ends with U+FFFD. Work per step is O(window), not O(sequence).
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Sequence

__all__ = ["ByteFallbackTable", "ByteFallbackDecoder", "WindowDecoder", "byte_fallback_table"]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPIECE_UNDERLINE = "\u2581"
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class ByteFallbackTable:
    """Per-id decoding facts of one tokenizer: piece text ("▁" already a space), byte value (-1 = not a byte piece),
    special flag (dropped with skip_special_tokens), and how many leading spaces the Strip decoder removes."""

    pieces: tuple[str, ...]
    byte_values: tuple[int, ...]
    special: tuple[bool, ...]
    strip_start: int


_TABLES: "weakref.WeakKeyDictionary[object, ByteFallbackTable | None]" = weakref.WeakKeyDictionary()


def _backend(tokenizer):
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _decoder_strip_start(tokenizer) -> int | None:
    """Leading-space strip count if the decoder is Replace(▁→' '), ByteFallback, Fuse[, Strip(' ', k, 0)]; else None."""
    try:
        decoder = json.loads(_backend(tokenizer).to_str()).get("decoder")
    except Exception:
        return None
    if not decoder or decoder.get("type") != "Sequence":
        return None
    steps = decoder.get("decoders", [])
    types = [d.get("type") for d in steps]
    if types[:3] != ["Replace", "ByteFallback", "Fuse"] or len(steps) not in (3, 4):
        return None
    replace = steps[0]
    if replace.get("pattern") != {"String": _SPIECE_UNDERLINE} or replace.get("content") != " ":
        return None
    if len(steps) == 3:
        return 0
    strip = steps[3]
    if strip.get("type") != "Strip" or strip.get("content") != " " or strip.get("stop", 0) != 0:
        return None
    return int(strip.get("start", 0))


def _build_table(tokenizer) -> ByteFallbackTable | None:
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None  # decode() post-processes the text: only the generic path reproduces it
    strip_start = _decoder_strip_start(tokenizer)
    if strip_start is None:
        return None
    backend = _backend(tokenizer)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else backend.get_vocab_size(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    pieces: list[str] = []
    byte_values: list[int] = []
    special: list[bool] = []
    for tid in range(size):
        token = backend.id_to_token(tid)
        if token is None:
            token = ""
        match = _BYTE_PIECE.match(token) if tid not in added else None
        byte_values.append(int(match.group(1), 16) if match else -1)
        pieces.append(token.replace(_SPIECE_UNDERLINE, " "))
        special.append(bool(tid in added and added[tid].special))
    table = ByteFallbackTable(tuple(pieces), tuple(byte_values), tuple(special), strip_start)
    return table if _self_check(tokenizer, table) else None


def _self_check(tokenizer, table: ByteFallbackTable) -> bool:
    """Compare the fast path with tokenizer.decode on probes (multi-byte text, specials, broken byte runs)."""
    probe_text = " Hello wörld, €5 — 日本語 😀 \n\tend  "
    ids = list(tokenizer.encode(probe_text, add_special_tokens=False))
    specials = [tid for tid, s in enumerate(table.special) if s][:4]
    byte_ids = [tid for tid, b in enumerate(table.byte_values) if b in (0xE2, 0x82, 0xAC, 0x80)]
    probes = [ids, specials + ids + specials, byte_ids + ids[:3] + byte_ids[:2], ids[:2] + specials[:1] + byte_ids]
    for probe in probes:
        for skip in (True, False):
            dec = ByteFallbackDecoder(table, skip_special_tokens=skip)
            text = dec.feed(probe) + dec.flush()
            if text != tokenizer.decode(probe, skip_special_tokens=skip):
                return False
    return True


def byte_fallback_table(tokenizer) -> ByteFallbackTable | None:
    """The fast-path table for `tokenizer` (cached per tokenizer object), or None if it does not qualify."""
    try:
        return _TABLES[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: build uncached
        return _build_table(tokenizer)
    table = _build_table(tokenizer)
    _TABLES[tokenizer] = table
    return table


class ByteFallbackDecoder:
    """Exact incremental decoding for Replace/ByteFallback/Fuse/Strip tokenizers (see module docstring)."""

    def __init__(self, table: ByteFallbackTable, skip_special_tokens: bool = True, strip_leading: bool = True) -> None:
        self._table = table
        self._skip = skip_special_tokens
        self._run = bytearray()
        self._strip_left = table.strip_start if strip_leading else 0

    def feed(self, token_ids: Sequence[int]) -> str:
        pieces, byte_values, special = self._table.pieces, self._table.byte_values, self._table.special
        size = len(pieces)
        out: list[str] = []
        for tid in token_ids:
            if not 0 <= tid < size or (self._skip and special[tid]):
                continue  # unknown ids and skipped specials are invisible, exactly as in decode()
            value = byte_values[tid]
            if value >= 0:
                self._run.append(value)
                continue
            if self._run:
                out.append(self._close_run())
            out.append(pieces[tid])
        return self._strip("".join(out))

    def flush(self) -> str:
        """Text of a still-open byte run (U+FFFD per byte if it is not valid UTF-8), as decode() renders it."""
        return self._strip(self._close_run()) if self._run else ""

    def _close_run(self) -> str:
        run = bytes(self._run)
        self._run.clear()
        try:
            return run.decode("utf-8")
        except UnicodeDecodeError:
            return _REPLACEMENT * len(run)

    def _strip(self, text: str) -> str:
        if self._strip_left and text:
            cut = 0
            while cut < len(text) and cut < self._strip_left and text[cut] == " ":
                cut += 1
            self._strip_left = 0 if cut < len(text) else self._strip_left - cut
            text = text[cut:]
        return text


class WindowDecoder:
    """Generic incremental decoding with vLLM's prefix/read offsets over `tokenizer.decode`."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(context_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _delta(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(_REPLACEMENT)):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            # keep the window short: drop tokens before prefix_offset
            if self._prefix_offset > 0:
                del self._ids[: self._prefix_offset]
                self._read_offset -= self._prefix_offset
                self._prefix_offset = 0
            return new_text[len(prefix_text) :]
        return ""

    def feed(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        self._ids.extend(int(t) for t in token_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)
