"""Load the checkpoint's fast tokenizer and make it the model's 32015-token vocabulary.

The official repos ship Phi-3's tokenizer only (32012 entries); the model code adds the three VLM tokens at load
time. We do the same, then check that every id the model depends on is where the weights expect it: a tokenizer that
disagrees would silently feed the wrong embeddings, so it is refused with a `CheckpointError` instead.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from ..errors import CheckpointError
from ..special_tokens import OFFICIAL_TOKEN_IDS, VLM_SPECIAL_TOKENS, VOCAB_SIZE

__all__ = ["load_tokenizer", "add_vlm_special_tokens", "disable_bos_eos", "verify_tokenizer"]


def add_vlm_special_tokens(tokenizer) -> int:
    """Add `<image>`, `<image placeholder>`, `<|endofchunk|>` (in that order) where absent; return how many were added.

    Same call as the official `update_special_tokens`, but extending (not replacing) the extra special tokens.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in VLM_SPECIAL_TOKENS if token not in vocab]
    if not missing:
        return 0
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    # transformers 5 renamed the keyword (the dict key "additional_special_tokens" is still accepted).
    keyword = "replace_extra_special_tokens" if "replace_extra_special_tokens" in params else "replace_additional_special_tokens"
    return tokenizer.add_special_tokens({"additional_special_tokens": missing}, **{keyword: False})


def disable_bos_eos(tokenizer) -> None:
    """Make `encode` add no BOS/EOS, as the official prompts (and add_bos_token=false) expect, whatever the
    tokenizer_config says."""
    for flag in ("add_bos_token", "add_eos_token"):
        if getattr(tokenizer, flag, False):
            setattr(tokenizer, flag, False)  # the setter rebuilds the post-processor


def verify_tokenizer(tokenizer, where: str = "tokenizer") -> None:
    """Raise `CheckpointError` unless every official token has its official id, the length is 32015 and no BOS/EOS
    is added by `encode`."""
    for token, expected in OFFICIAL_TOKEN_IDS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise CheckpointError(f"{where}: token {token!r} has id {got}, expected the official id {expected}")
    if len(tokenizer) != VOCAB_SIZE:
        raise CheckpointError(f"{where}: has {len(tokenizer)} tokens after adding the VLM tokens, expected {VOCAB_SIZE}")
    probe = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if probe and ((bos is not None and probe[0] == bos) or (eos is not None and probe[-1] == eos)):
        raise CheckpointError(
            f"{where}: encode() adds BOS/EOS tokens ({probe}); the official tokenizer has add_bos_token=false"
        )


def load_tokenizer(checkpoint_dir: str | Path):
    """Load `checkpoint_dir`'s tokenizer as an `XGenMMTokenizer` (the fast tokenizer whose encoding reproduces the
    official slow `legacy=False` ids; never remote code), add the VLM tokens and verify the official ids."""
    from transformers import PreTrainedTokenizerFast

    from .hf import XGenMMTokenizer

    path = Path(checkpoint_dir)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json (or tokenizer.model) in the checkpoint directory")
    try:
        # Our class directly (not AutoTokenizer): config.json is an `xgenmm` remote-code config that transformers
        # cannot (and must not) load, and the tokenizer_config.json's class would lose the exact encoding.
        tokenizer = XGenMMTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds here; name the directory
        raise CheckpointError(f"{path}: cannot load the tokenizer: {exc}") from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise CheckpointError(f"{path}: expected a fast tokenizer, got {type(tokenizer).__name__}")
    disable_bos_eos(tokenizer)
    add_vlm_special_tokens(tokenizer)
    verify_tokenizer(tokenizer, where=str(path))
    return tokenizer
