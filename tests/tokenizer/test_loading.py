"""Tokenizer loading: official special ids, VLM tokens added at 32012..32014, no BOS, Phi-3 rstrip, byte fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from xgenmm import special_tokens as st
from xgenmm.errors import CheckpointError
from xgenmm.testing import make_random_checkpoint
from xgenmm.tokenizer import XGenMMTokenizer, load_tokenizer, verify_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("tok"), config_only=True)


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt)


def test_loader_returns_the_upstream_exact_tokenizer(tok):
    assert isinstance(tok, XGenMMTokenizer)


def test_random_tokenizer_files_match_official_layout(ckpt):
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False and cfg["legacy"] is False and cfg["tokenizer_class"] == "LlamaTokenizer"
    assert cfg["eos_token"] == "<|endoftext|>" and cfg["pad_token"] == "<pad>"
    assert set(cfg["added_tokens_decoder"]) == {"0", "1", "2", *map(str, range(32000, 32012))}
    added = json.loads((ckpt / "added_tokens.json").read_text())
    assert added["<|end|>"] == 32007 and len(added) == 12
    assert "<image>" not in (ckpt / "tokenizer.json").read_text()  # the loader adds the VLM tokens, as upstream
    vocab = json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 32000 and vocab["<0x00>"] == 3 and vocab["<0xFF>"] == 258 and vocab["<0x0A>"] == 13


def test_official_ids_and_length(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == st.VOCAB_SIZE == 32015
    for token, tid in st.OFFICIAL_TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(token) == tid, token
    assert tok.convert_ids_to_tokens([0, 1, 2, 13]) == ["<unk>", "<s>", "</s>", "<0x0A>"]
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (32000, 32011, 1)
    assert st.IMAGE_TOKEN_ID == 32012 and st.END_TOKEN_ID == 32007 and st.VOCAB_SIZE == 32015


def test_no_bos_or_eos_added(tok):
    ids = tok.encode("hello world")
    assert ids and ids[0] != st.BOS_TOKEN_ID and ids[-1] not in (st.ENDOFTEXT_TOKEN_ID, st.EOS_SP_TOKEN_ID)
    assert tok("hello world").input_ids == tok("hello world", add_special_tokens=False).input_ids == ids


def test_loader_forces_no_bos_even_if_config_asks(ckpt, tmp_path):
    bad = tmp_path / "bos"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(bad)
    assert tok.encode("hi")[0] != st.BOS_TOKEN_ID
    # verify_tokenizer itself refuses a tokenizer that adds BOS
    tok.add_bos_token = True
    assert tok.encode("hi")[0] == st.BOS_TOKEN_ID
    with pytest.raises(CheckpointError, match="BOS"):
        verify_tokenizer(tok)


def test_rstrip_tokens_eat_following_newline(tok):
    space = tok.convert_tokens_to_ids("\u2581")
    ids = tok.encode("<|user|>\nhello")
    # Upstream (slow legacy=False) puts "▁" in front of the text; a role tag is not a special token, so it stays.
    assert ids[:2] == [space, 32010] and 13 not in ids and ids == tok.encode("<|user|>hello")
    assert tok.encode("<|system|>\n\nx") == tok.encode("<|system|>x")  # rstrip eats all following whitespace
    assert tok.encode("<|end|>\n<|assistant|>\n") == [32007, 32001]  # <|end|> is special: no leading "▁"
    # <image> (added by the loader) is special and not rstrip: no "▁" before it, the newline stays as byte 13
    ids = tok.encode("<image>\nhello")
    assert ids[:2] == [32012, 13]
    assert tok.encode("<image>\n") == [32012, 13]
    assert tok.encode("\n") == [space, 13]  # Llama: text start gets the "▁" prefix


def test_vlm_tokens_never_split(tok):
    assert tok.encode("a<image>b<image placeholder><|endofchunk|>").count(32012) == 1
    assert 32013 in tok.encode("<image placeholder>") and tok.encode("<|endofchunk|>") == [32014]


@pytest.mark.parametrize("text", ["héllo 世界 🙂", "naïve café — ok", "tab\there\nnew line", "two  spaces  inside  "])
def test_byte_fallback_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if not text.isascii():
        assert any(3 <= i <= 258 for i in ids)  # multi-byte characters go through byte pieces


def test_english_uses_merged_pieces(tok):
    text = "What is in the image? Describe the picture in detail."
    ids = tok.encode(text)
    assert len(ids) < len(text) / 2.5
    assert tok.decode(ids) == text


def test_skip_special_tokens_on_decode(tok):
    ids = tok.encode("<|user|>\nhi<|end|>\n<image>")
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_reload_of_saved_tokenizer_keeps_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert len(again) == 32015 and again.convert_tokens_to_ids("<|endofchunk|>") == 32014


def test_wrong_ids_raise_checkpoint_error_naming_token(ckpt, tmp_path):
    bad = tmp_path / "nopad"
    shutil.copytree(ckpt, bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<pad>"]
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    del cfg["added_tokens_decoder"]["32011"]
    cfg["pad_token"] = None
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    (bad / "added_tokens.json").unlink()
    (bad / "special_tokens_map.json").unlink()
    with pytest.raises(CheckpointError, match="<pad>"):
        load_tokenizer(bad)


def test_missing_tokenizer_raises(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
