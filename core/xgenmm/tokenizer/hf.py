"""`XGenMMTokenizer`: the checkpoint's fast tokenizer whose every encode path gives upstream's exact prompt ids.

Whatever calls it (`tokenizer(text)`, `encode`, `tokenize`, batches, vLLM's renderer, LangChain's token counter),
text goes through `SlowLlamaPromptEncoder`, i.e. the slow `LlamaTokenizer(legacy=False)` rules the official code
tokenizes with, on transformers 4.46 to 5.x alike (their own Llama tokenizers disagree with it: 5.x drops the
leading "▁", 4.x's fast one prefixes every chunk). Everything else (decoding, vocabulary, added tokens, the Rust
backend that llguidance and vLLM's detokenizer read) is the stock fast tokenizer.

Like the slow tokenizer, it encodes single texts and batches of texts; offsets come from our own spans. Pairs of
texts, pre-split words and overflowing windows are refused with a `NotImplementedError` naming the option, rather
than silently tokenized another way.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import BatchEncoding, LlamaTokenizerFast
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

from ..special_tokens import UPSTREAM_SPECIAL_TOKENS
from .slow_llama import AddedTokenRule, SlowLlamaPromptEncoder

__all__ = ["XGenMMTokenizer"]

# The tokenizer_class the official tokenizer_config.json names; what `save_pretrained` writes back.
OFFICIAL_TOKENIZER_CLASS = "LlamaTokenizer"


class XGenMMTokenizer(LlamaTokenizerFast):
    """Phi-3's tokenizer as xGen-MM uses it; see the module docstring."""

    # ---- the exact encoder -----------------------------------------------------------------------------------------
    @property
    def prompt_encoder(self) -> SlowLlamaPromptEncoder:
        """Built on first use from the current added tokens (rebuilt after `add_tokens` / `add_special_tokens`)."""
        encoder = self.__dict__.get("_xgenmm_prompt_encoder")
        if encoder is None:
            rules = [
                AddedTokenRule(str(tok), int(tid), bool(getattr(tok, "lstrip", False)), bool(getattr(tok, "rstrip", False)))
                for tid, tok in self.added_tokens_decoder.items()
            ]
            add_prefix_space = getattr(self, "add_prefix_space", None)
            encoder = SlowLlamaPromptEncoder.from_backend(
                self.backend_tokenizer,
                rules,
                UPSTREAM_SPECIAL_TOKENS,
                add_prefix_space=True if add_prefix_space is None else bool(add_prefix_space),
            )
            self.__dict__["_xgenmm_prompt_encoder"] = encoder
        return encoder

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        self.__dict__.pop("_xgenmm_prompt_encoder", None)
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_xgenmm_prompt_encoder", None)  # rebuilt on demand (deepcopy, pickling, vLLM's tokenizer pool)
        return state

    # ---- HF encode entry points ------------------------------------------------------------------------------------
    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False, **kwargs) -> list[str]:
        _refuse(pair=pair is not None)
        split = not kwargs.get("split_special_tokens", self.split_special_tokens)
        tokens = list(self.prompt_encoder.encode(text, split_added_tokens=split, with_details=True).tokens)
        if add_special_tokens:
            tokens = self.convert_ids_to_tokens(self._with_special_tokens(self.convert_tokens_to_ids(tokens))[0])
        return tokens

    def _encode_plus(self, text, text_pair=None, add_special_tokens: bool = True, **kwargs) -> BatchEncoding:
        """transformers 5: every encode path; transformers 4: the single-text path."""
        batched = isinstance(text, (list, tuple))
        out = self._exact_batch(list(text) if batched else [text], text_pair, add_special_tokens, **kwargs)
        if not batched and kwargs.get("return_tensors") is None:
            out = BatchEncoding({key: value[0] for key, value in out.items()})
        return out

    def _batch_encode_plus(self, batch_text_or_text_pairs, add_special_tokens: bool = True, **kwargs) -> BatchEncoding:
        """transformers 4: the batch path."""
        if not isinstance(batch_text_or_text_pairs, (list, tuple)):
            raise TypeError(f"batch_text_or_text_pairs has to be a list or a tuple, got {type(batch_text_or_text_pairs)}")
        _refuse(text_pair=any(isinstance(t, (list, tuple)) for t in batch_text_or_text_pairs))
        return self._exact_batch(list(batch_text_or_text_pairs), None, add_special_tokens, **kwargs)

    def _exact_batch(
        self,
        texts: list,
        text_pair=None,
        add_special_tokens: bool = True,
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        truncation_strategy=TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors=None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        split_special_tokens: bool | None = None,
        **kwargs,
    ) -> BatchEncoding:
        _refuse(
            text_pair=text_pair is not None,
            is_split_into_words=is_split_into_words,
            return_overflowing_tokens=return_overflowing_tokens,
            stride=bool(stride),
            sanitize_control_tokens=bool(kwargs.get("sanitize_control_tokens")),
        )
        if split_special_tokens is None:
            split_special_tokens = self.split_special_tokens
        encodings = self.prompt_encoder.encode_batch(texts, split_added_tokens=not split_special_tokens,
                                                     with_details=return_offsets_mapping)
        truncate = truncation_strategy not in (TruncationStrategy.DO_NOT_TRUNCATE, "do_not_truncate")
        if truncate and truncation_strategy in (TruncationStrategy.ONLY_SECOND, "only_second"):
            raise ValueError("truncation='only_second' needs a text pair; this tokenizer encodes single texts")
        columns: dict[str, list] = {"input_ids": []}
        if return_offsets_mapping:
            columns["offset_mapping"] = []
        if return_special_tokens_mask:
            columns["special_tokens_mask"] = []
        if return_token_type_ids:
            columns["token_type_ids"] = []
        for enc in encodings:
            ids, offsets = list(enc.ids), list(enc.offsets)
            special = [0] * len(ids)
            if add_special_tokens:
                ids, head, tail = self._with_special_tokens(ids)
                offsets = [(0, 0)] * head + offsets + [(0, 0)] * tail
                special = [1] * head + special + [1] * tail
            if truncate and max_length is not None and len(ids) > max_length:
                keep = slice(len(ids) - max_length, None) if self.truncation_side == "left" else slice(0, max_length)
                ids, offsets, special = ids[keep], offsets[keep], special[keep]
            columns["input_ids"].append(ids)
            if return_offsets_mapping:
                columns["offset_mapping"].append(offsets)
            if return_special_tokens_mask:
                columns["special_tokens_mask"].append(special)
            if return_token_type_ids:
                columns["token_type_ids"].append([0] * len(ids))
        for ids in columns["input_ids"]:
            self._eventual_warn_about_too_long_sequence(ids, max_length, verbose)
        if padding_strategy in (PaddingStrategy.DO_NOT_PAD, "do_not_pad", False) and pad_to_multiple_of is None:
            # Nothing to pad: skip `pad`'s per-call overhead (half the time of a short prompt).
            if return_attention_mask is None:
                return_attention_mask = "attention_mask" in self.model_input_names
            if return_attention_mask:
                columns["attention_mask"] = [[1] * len(ids) for ids in columns["input_ids"]]
            if return_length:
                columns["length"] = [len(ids) for ids in columns["input_ids"]]
            return BatchEncoding(columns, tensor_type=return_tensors)
        offsets = columns.pop("offset_mapping", None)
        padded = self.pad(
            columns,
            padding=padding_strategy,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
            verbose=verbose,
        )
        data = dict(padded)
        if offsets is not None:
            side = padding_side or self.padding_side
            data["offset_mapping"] = [
                _pad_offsets(o, len(ids), side) for o, ids in zip(offsets, data["input_ids"])
            ]
        if return_length:
            data["length"] = [len(ids) for ids in data["input_ids"]]
        return BatchEncoding(data, tensor_type=return_tensors)

    def _with_special_tokens(self, ids: list[int]) -> tuple[list[int], int, int]:
        """BOS / EOS as `add_bos_token` / `add_eos_token` say (both false for xGen-MM); (ids, added in front, at end)."""
        head = [self.bos_token_id] if getattr(self, "add_bos_token", False) and self.bos_token_id is not None else []
        tail = [self.eos_token_id] if getattr(self, "add_eos_token", False) and self.eos_token_id is not None else []
        return head + ids + tail, len(head), len(tail)

    # ---- saving --------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs):
        """As the stock tokenizer, but the saved tokenizer_config.json names the official `LlamaTokenizer` class, so
        the folder still loads anywhere (and through `load_tokenizer` with this class again)."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_path = Path(save_directory) / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["tokenizer_class"] = OFFICIAL_TOKENIZER_CLASS
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return files


def _pad_offsets(offsets: list[tuple[int, int]], length: int, side: str) -> list[tuple[int, int]]:
    pad = [(0, 0)] * (length - len(offsets))
    return pad + offsets if side == "left" else offsets + pad


def _refuse(**options: bool) -> None:
    """Raise for encode options the slow tokenizer's rules do not define for this model."""
    used = [name for name, on in options.items() if on]
    if used:
        raise NotImplementedError(
            f"XGenMMTokenizer encodes prompt text exactly as the official (slow) tokenizer does; "
            f"{', '.join(used)} is not supported"
        )
