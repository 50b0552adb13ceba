"""Compile `StructuredOutputsParams` into llguidance matchers over the model's 32015-token vocabulary.

One `llguidance.LLTokenizer` is built per (tokenizer, vocab size, EOS) and shared process-wide (it takes ~0.1-1 s
to build). Validated grammars are cached as matcher prototypes (LRU), so a repeated schema costs one `deep_copy`.
Invalid schemas / regexes / grammars raise `SamplingParamsError` at request time, so the request fails alone.
"""

from __future__ import annotations

import copy
import json
import threading
import weakref
from collections import OrderedDict
from typing import Any

import llguidance

from ..errors import SamplingParamsError
from ..sampling_params import StructuredOutputsParams
from ..special_tokens import END_TOKEN_ID, VLM_SPECIAL_TOKENS, VOCAB_SIZE, OFFICIAL_TOKEN_IDS
from .matcher import GrammarMatcher

__all__ = ["CompiledGrammar", "GrammarCompiler", "build_ll_tokenizer", "grammar_spec"]

# Image / placeholder / chunk tokens: a grammar must never let the model emit them.
FORBIDDEN_TOKEN_IDS: tuple[int, ...] = tuple(OFFICIAL_TOKEN_IDS[t] for t in VLM_SPECIAL_TOKENS)

_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict[tuple, llguidance.LLTokenizer]]" = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


def _tokenizer_json(tokenizer) -> str:
    """The tokenizer.json text of an HF fast tokenizer (with its added tokens) or a `tokenizers.Tokenizer`."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise TypeError(f"structured outputs need a fast tokenizer, got {type(tokenizer).__name__}")
    backend = copy.copy(backend)  # padding / truncation settings must not leak into llguidance
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


def build_ll_tokenizer(tokenizer, vocab_size: int = VOCAB_SIZE, eos_token_id: int = END_TOKEN_ID) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for `tokenizer`, cached per tokenizer object. Its EOS is `eos_token_id`
    (`<|end|>` = 32007 for the chat models: the token a grammar allows once the output is complete)."""
    key = (int(vocab_size), int(eos_token_id))
    with _LL_LOCK:
        try:
            per_tok = _LL_TOKENIZERS.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable / hashable: build without caching
            per_tok = {}
        ll = per_tok.get(key)
        if ll is None:
            ll = llguidance.LLTokenizer(_tokenizer_json(tokenizer), n_vocab=key[0], eos_token=key[1])
            per_tok[key] = ll
        return ll


def grammar_spec(params: StructuredOutputsParams) -> str:
    """The llguidance grammar text for `params` (not yet validated)."""
    defaults = {"whitespace_flexible": params.whitespace_flexible}
    kind = params.kind
    try:
        if kind == "json":
            schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=defaults)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            # Lark string literals accept JSON escapes, so json.dumps quotes any choice safely.
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
        return llguidance.LLMatcher.grammar_from_lark(params.grammar)
    except (ValueError, TypeError) as exc:
        raise SamplingParamsError(f"invalid structured_outputs.{kind}: {exc}", field=f"structured_outputs.{kind}") from None


def _cache_key(params: StructuredOutputsParams) -> str:
    value = params.json if params.kind == "json" else getattr(params, params.kind)
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True)
    return json.dumps([params.kind, value, params.whitespace_flexible])


def _first_line(message: str) -> str:
    """llguidance errors carry a parser-state dump after the first line; keep the part a user can act on."""
    head = message.strip().split("\n<state>")[0].strip()
    return head.splitlines()[0] if head.count("\n") > 8 else head


class GrammarCompiler:
    """Turns `StructuredOutputsParams` into fresh `GrammarMatcher`s for one tokenizer.

    `compile` is thread-safe; every call returns an independent matcher (one per sequence).
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int = VOCAB_SIZE,
        eos_token_id: int = END_TOKEN_ID,
        forbidden_token_ids: tuple[int, ...] = FORBIDDEN_TOKEN_IDS,
        cache_size: int = 128,
    ) -> None:
        self.vocab_size = int(vocab_size)
        self.eos_token_id = int(eos_token_id)
        self.forbidden_token_ids = tuple(int(t) for t in forbidden_token_ids)
        self.ll_tokenizer = build_ll_tokenizer(tokenizer, self.vocab_size, self.eos_token_id)
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> GrammarMatcher:
        """A matcher at the start of the grammar. Raises `SamplingParamsError` for an invalid schema / grammar."""
        return self.compile_grammar(params).matcher()

    def compile_grammar(self, params: StructuredOutputsParams) -> "CompiledGrammar":
        """The grammar compiled once (validated: `SamplingParamsError` if invalid); `.matcher()` gives each sequence
        its own matcher without compiling again."""
        if not isinstance(params, StructuredOutputsParams):
            raise SamplingParamsError(f"structured_outputs must be StructuredOutputsParams, got {type(params).__name__}",
                                      field="structured_outputs")
        key = _cache_key(params)
        with self._lock:
            proto = self._cache.get(key)
            if proto is not None:
                self._cache.move_to_end(key)
        if proto is None:
            proto = self._build(params)
            with self._lock:
                self._cache[key] = proto
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return CompiledGrammar(params.kind, proto, self.eos_token_id, self.vocab_size, self.forbidden_token_ids)

    def _build(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        spec = grammar_spec(params)
        kind = params.kind
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(spec, self.ll_tokenizer)
        if is_error:
            raise SamplingParamsError(f"invalid structured_outputs.{kind}: {_first_line(messages[0])}",
                                      field=f"structured_outputs.{kind}")
        matcher = llguidance.LLMatcher(self.ll_tokenizer, spec, log_level=0)
        if matcher.is_error():
            raise SamplingParamsError(f"invalid structured_outputs.{kind}: {_first_line(matcher.get_error())}",
                                      field=f"structured_outputs.{kind}")
        return matcher


class CompiledGrammar:
    """One validated, compiled grammar (an llguidance matcher prototype); `matcher()` copies it for one sequence."""

    def __init__(self, kind: str, proto: llguidance.LLMatcher, eos_token_id: int, vocab_size: int,
                 forbidden_token_ids: tuple[int, ...]) -> None:
        self.kind = kind
        self._proto = proto
        self._args = (eos_token_id, vocab_size, forbidden_token_ids)

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._proto.deep_copy(), *self._args)
