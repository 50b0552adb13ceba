"""vLLM tokenizer loading for xGen-MM checkpoints: the official repos ship Phi-3's 32012-token tokenizer without
the three VLM tokens, which the model code adds at load time. vLLM would load the bare tokenizer, where `<image>` is
plain text and the vocabulary is 3 short. So the plugin puts this loader in vLLM's "hf" tokenizer slot: for an xGen-MM
checkpoint directory it loads the tokenizer exactly as the native engine does (`xgenmm.tokenizer.load_tokenizer`:
VLM tokens added at their official ids, no BOS, ids verified) and gives it the Phi-3 chat template when the files
carry none; every other model goes through vLLM's own `CachedHfTokenizer` unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm.tokenizers.hf import CachedHfTokenizer, get_cached_tokenizer

from ..special_tokens import END_TOKEN
from .hf_config import MODEL_TYPE

# The Phi-3 chat template of the official tokenizer_config.json, used only when a checkpoint has none. vLLM puts the
# model's placeholder string (`<image>`) into the user text for each image part.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ '<|endoftext|>' }}{% endif %}"
)


def is_xgenmm_checkpoint(path: str | Path) -> bool:
    """True for a local directory whose config.json says model_type "xgenmm"."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_xgenmm_tokenizer(path: str | Path, truncation_side: str | None = None):
    """The native engine's tokenizer (32015 tokens, official ids, eos `<|end|>`), with a chat template, for vLLM."""
    from ..tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    # The chat models end a turn with <|end|>: the official demos set it as the eos token, and so do we, so vLLM
    # stops there by default; <|endoftext|> (generation_config.json's eos) still stops it too.
    tokenizer.eos_token = END_TOKEN
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    if truncation_side is not None:
        tokenizer.truncation_side = truncation_side
    return get_cached_tokenizer(tokenizer)


class XGenMMAwareHfTokenizer(CachedHfTokenizer):
    """vLLM's "hf" tokenizer mode, plus the xGen-MM VLM tokens for xGen-MM checkpoints."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *args, **kwargs):
        if is_xgenmm_checkpoint(path_or_repo_id):
            return load_xgenmm_tokenizer(path_or_repo_id, kwargs.get("truncation_side"))
        return super().from_pretrained(path_or_repo_id, *args, **kwargs)
