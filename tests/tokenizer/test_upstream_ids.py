"""Prompt ids equal upstream's: the slow sentencepiece `LlamaTokenizer(legacy=False)` the official demos use.

The golden ids were recorded by that tokenizer (transformers 4.44.2 + sentencepiece, checked again on 4.46.3) with
tests/fixtures/tokenizer/record_golden.py, on a sentencepiece-trained model in the Phi-3 layout and on the real
LLaMA-2 / Phi-3 vocabulary. Here our tokenizer, on whatever transformers this environment has, must reproduce them
through every HF encode entry point, and keep decoding as before.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

from tests.support import TOKENIZER_FIXTURES
from xgenmm import special_tokens as st
from xgenmm.tokenizer import SlowLlamaPromptEncoder, XGenMMTokenizer, load_tokenizer

CASES = json.loads((TOKENIZER_FIXTURES / "cases.json").read_text(encoding="utf-8"))
CASE_IDS = [c["id"] for c in CASES]
TEXT = {c["id"]: c["text"] for c in CASES}


@pytest.fixture(scope="module")
def golden(golden_ids):
    return golden_ids


@pytest.fixture(scope="module")
def spm_tok(spm_tokenizer_dir):
    return load_tokenizer(spm_tokenizer_dir)


@pytest.fixture(scope="module")
def llama2_tok(llama2_tokenizer_dir):
    return load_tokenizer(llama2_tokenizer_dir)


@pytest.mark.parametrize("case", CASE_IDS)
def test_sentencepiece_model_ids_equal_slow_tokenizer(spm_tok, case, golden):
    want = golden("spm")[case]
    text = TEXT[case]
    assert spm_tok.encode(text, add_special_tokens=False) == want
    assert spm_tok(text).input_ids == want  # the demos' call (add_special_tokens=True: still no BOS)
    assert spm_tok.convert_tokens_to_ids(spm_tok.tokenize(text)) == want


def test_real_llama2_vocabulary_ids_equal_slow_tokenizer(llama2_tok, golden):
    want = golden("llama2")
    got = llama2_tok([TEXT[c] for c in CASE_IDS], add_special_tokens=False).input_ids
    mismatches = [c for c, ids in zip(CASE_IDS, got) if ids != want[c]]
    assert not mismatches, mismatches
    # The issue's own example: `<|user|>\nhello` -> [29871, 32010, 12199] upstream (transformers 5 alone: no 29871).
    assert llama2_tok.encode("<|user|>\nhello") == [29871, 32010, 12199]
    assert llama2_tok.encode("<|system|>\nA")[:3] == [29871, 32006, 29909]  # "A", not "▁A" (319)


def test_batch_equals_one_by_one(spm_tok, golden):
    texts = [TEXT[c] for c in CASE_IDS]
    batch = spm_tok(texts).input_ids
    assert batch == [spm_tok(t).input_ids for t in texts] == [golden("spm")[c] for c in CASE_IDS]


def test_the_leading_marker_rule(spm_tok, golden):
    space = spm_tok.convert_tokens_to_ids("\u2581")
    # Role tags are added but not special tokens: the "▁" stays; special ones (upstream's set) drop it.
    for tag in ("<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>", "<|placeholder1|>", "</s>"):
        assert spm_tok.encode(tag + "x")[:2] == [space, spm_tok.convert_tokens_to_ids(tag)], tag
    for tag in st.UPSTREAM_SPECIAL_TOKENS:
        assert spm_tok.encode(tag + "x")[0] == spm_tok.convert_tokens_to_ids(tag), tag
    # The rule is upstream's whatever this tokenizer's own eos is (the vLLM plugin sets <|end|>, native keeps the
    # file's <|endoftext|>): both give the same ids.
    other = copy.deepcopy(spm_tok)
    other.eos_token = "<|end|>"
    for case in ("starts_end", "starts_endoftext", "user_00"):
        assert other.encode(TEXT[case]) == spm_tok.encode(TEXT[case]) == golden("spm")[case]


def test_offsets_point_into_the_original_text(spm_tok):
    text = "<|user|>\n  héllo wörld<image>\nWhat?"
    enc = spm_tok(text, return_offsets_mapping=True)
    assert len(enc.offset_mapping) == len(enc.input_ids)
    pieces = spm_tok.convert_ids_to_tokens(enc.input_ids)
    for piece, (start, end) in zip(pieces, enc.offset_mapping):
        if piece in ("<|user|>", "<image>"):
            assert text[start:end] == piece
        elif piece == "\u2581":
            assert start == end == 0  # the marker the tokenizer puts in front
        elif not piece.startswith("<0x"):
            assert text[start:end].replace(" ", "\u2581") in (piece, piece[1:]), (piece, text[start:end])


def test_padding_truncation_and_tensors(spm_tok):
    texts = ["<|user|>\nhi", "a longer prompt with several words in it"]
    enc = spm_tok(texts, padding=True, return_tensors="pt")
    assert isinstance(enc.input_ids, torch.Tensor) and enc.input_ids.shape[0] == 2
    short = spm_tok(texts[0]).input_ids
    assert spm_tok.padding_side == "left"
    assert enc.input_ids[0, -len(short):].tolist() == short
    assert enc.attention_mask[0].tolist() == [0] * (enc.input_ids.shape[1] - len(short)) + [1] * len(short)
    assert set(enc.input_ids[0, : enc.input_ids.shape[1] - len(short)].tolist()) <= {spm_tok.pad_token_id}
    full = spm_tok(texts[1]).input_ids
    assert spm_tok(texts[1], truncation=True, max_length=3).input_ids == full[:3]
    left = copy.deepcopy(spm_tok)
    left.truncation_side = "left"
    assert left(texts[1], truncation=True, max_length=3).input_ids == full[-3:]
    assert spm_tok(texts[1], return_length=True)["length"] == len(full)


def test_split_special_tokens_treats_every_tag_as_text(spm_tok):
    # The slow tokenizer's `split_special_tokens=True`: no added token is recognised at all.
    ids = spm_tok("<|user|>\nhi<image>", split_special_tokens=True).input_ids
    assert not set(ids) & {32010, 32012} and spm_tok.decode(ids) == "<|user|>\nhi<image>"


def test_bos_when_asked(spm_tok):
    tok = copy.deepcopy(spm_tok)
    tok.add_bos_token = True
    assert tok.encode("<|user|>\nhi") == [st.BOS_TOKEN_ID] + spm_tok.encode("<|user|>\nhi")
    assert tok.encode("<|user|>\nhi", add_special_tokens=False) == spm_tok.encode("<|user|>\nhi")


def test_unsupported_options_are_refused_by_name(spm_tok):
    with pytest.raises(NotImplementedError, match="text_pair"):
        spm_tok("a", "b")
    with pytest.raises(NotImplementedError, match="is_split_into_words"):
        spm_tok(["a", "b"], is_split_into_words=True)
    with pytest.raises(NotImplementedError, match="return_overflowing_tokens"):
        spm_tok("a b c", truncation=True, max_length=1, return_overflowing_tokens=True)


def test_pickle_deepcopy_and_save_keep_exact_ids(spm_tok, tmp_path, golden):
    text = TEXT["interleave_lavis"]
    for clone in (pickle.loads(pickle.dumps(spm_tok)), copy.deepcopy(spm_tok)):
        assert isinstance(clone, XGenMMTokenizer) and clone.encode(text) == golden("spm")["interleave_lavis"]
    spm_tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode(text) == golden("spm")["interleave_lavis"]
    import json

    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"


def test_added_tokens_after_load_are_recognised(spm_tokenizer_dir):
    tok = load_tokenizer(spm_tokenizer_dir)
    before = tok.encode("x<|newtag|>y")
    tok.add_special_tokens({"additional_special_tokens": ["<|newtag|>"]})
    new_id = tok.convert_tokens_to_ids("<|newtag|>")
    after = tok.encode("x<|newtag|>y")
    assert new_id not in before and new_id in after


@pytest.mark.parametrize("text", ["hello world", " leading space", "héllo wörld 日本 🙂", "tab\there\nnew line  ",
                                  "multiple     spaces", "x"])
def test_decoding_round_trips_without_stray_space(spm_tok, text):
    """Decoding is the stock fast decoder: the "▁" put in front of the prompt disappears again."""
    assert spm_tok.decode(spm_tok.encode(text)) == text
    assert spm_tok.decode(spm_tok.encode(f"<|user|>\n{text}<|end|>"), skip_special_tokens=True) == text.lstrip()


def test_encoder_is_usable_without_transformers_wrappers(spm_tok, golden):
    enc = spm_tok.prompt_encoder
    assert isinstance(enc, SlowLlamaPromptEncoder)
    out = enc.encode(TEXT["sft_multi_image"])
    assert out.ids == golden("spm")["sft_multi_image"] and len(out.tokens) == len(out.offsets) == len(out.ids)
