"""Grammar-constrained decoding (llguidance): JSON schema, any JSON object, regex, choice and Lark grammars.

Shared by every front end through the engine's sampler: `GrammarCompiler(tokenizer).compile(params)` gives one
`GrammarMatcher` per sequence; the sampler masks logits with its bitmask and feeds it the sampled tokens.
"""

from .bitmask import allocate_token_bitmask, apply_token_bitmask, bitmask_to_allowed, bitmask_words
from .compiler import FORBIDDEN_TOKEN_IDS, CompiledGrammar, GrammarCompiler, build_ll_tokenizer, grammar_spec
from .matcher import GrammarMatcher, fill_bitmasks

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarMatcher",
    "FORBIDDEN_TOKEN_IDS",
    "build_ll_tokenizer",
    "grammar_spec",
    "fill_bitmasks",
    "allocate_token_bitmask",
    "apply_token_bitmask",
    "bitmask_to_allowed",
    "bitmask_words",
]
