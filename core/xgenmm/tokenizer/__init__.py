"""The checkpoint's tokenizer: loading with the VLM tokens at their official ids (`loading`), and encoding that
reproduces the official slow `LlamaTokenizer(legacy=False)` prompt ids exactly (`slow_llama`, `hf`)."""

from .hf import XGenMMTokenizer
from .loading import add_vlm_special_tokens, disable_bos_eos, load_tokenizer, verify_tokenizer
from .slow_llama import AddedTokenRule, PromptEncoding, SlowLlamaPromptEncoder

__all__ = [
    "load_tokenizer",
    "add_vlm_special_tokens",
    "disable_bos_eos",
    "verify_tokenizer",
    "XGenMMTokenizer",
    "SlowLlamaPromptEncoder",
    "AddedTokenRule",
    "PromptEncoding",
]
