"""IncrementalDetokenizer: deltas concatenate to tokenizer.decode, never revise or split characters, stop strings."""

import random

import pytest

from xgenmm.engine.detokenizer import IncrementalDetokenizer, StopStringBuffer
from xgenmm.special_tokens import END_TOKEN_ID
from xgenmm.testing import save_random_tokenizer
from xgenmm.tokenizer import load_tokenizer

BYTE_IDS = list(range(3, 259))  # <0x00>..<0xFF>
SPECIAL_IDS = [0, 1, 2] + list(range(32000, 32015))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_random_tokenizer(path)
    return load_tokenizer(path)


def random_text(rng: random.Random, length: int) -> str:
    pools = [(32, 127), (0xA0, 0x800), (0x3040, 0x3100), (0x4E00, 0x4F00), (0x1F600, 0x1F650)]
    out = []
    for _ in range(length):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randrange(lo, hi)))
    return "".join(out)


def random_ids(rng: random.Random, tokenizer, vocab: int) -> list[int]:
    ids = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.35:
            ids.append(rng.choice(BYTE_IDS))  # byte runs: valid, truncated and invalid UTF-8
        elif r < 0.45:
            ids.append(rng.choice(SPECIAL_IDS))
        else:
            ids.append(rng.randrange(vocab))
    if rng.random() < 0.5:
        ids = tokenizer.encode(random_text(rng, rng.randint(0, 25)), add_special_tokens=False) + ids[: rng.randint(0, 6)]
    return ids


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random, full: str | None = None) -> str:
    """Feed ids in random chunks; check every intermediate text is a prefix of `full` (nothing is ever revised)."""
    pieces = []
    i = 0
    while i < len(ids):
        k = rng.randint(1, 4)
        pieces.append(detok.update(ids[i : i + k]))
        i += k
        if full is not None:
            assert full.startswith("".join(pieces))
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.text
    return detok.text


@pytest.mark.parametrize("skip", [True, False])
def test_deltas_concatenate_to_full_decode_on_random_ids(tokenizer, skip):
    rng = random.Random(1234 + skip)
    vocab = len(tokenizer)
    for _ in range(600):
        ids = random_ids(rng, tokenizer, vocab)
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        detok = IncrementalDetokenizer(tokenizer, [5, 6], skip_special_tokens=skip)
        assert detok.is_fast_path
        assert stream(detok, ids, rng, full) == full, ids


def test_never_emits_half_a_character(tokenizer):
    rng = random.Random(7)
    for _ in range(200):
        text = random_text(rng, 30)
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer)
        for tid in ids:
            delta = detok.update([tid])
            assert "\ufffd" not in delta
        detok.flush()
        assert detok.text == tokenizer.decode(ids)


def test_byte_run_is_held_until_it_cannot_change(tokenizer):
    euro = [3 + 0xE2, 3 + 0x82, 3 + 0xAC]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.update(euro) == ""  # a following stray byte would still turn the run into U+FFFD x 4
    assert detok.update([3 + 0x80]) == ""
    assert detok.flush() == "\ufffd" * 4 == tokenizer.decode(euro + [3 + 0x80])
    detok = IncrementalDetokenizer(tokenizer)
    detok.update(euro)
    word = tokenizer.encode("ok", add_special_tokens=False)
    assert detok.update(word) == tokenizer.decode(euro + word)
    # a skipped special token does not end a byte run (decode() drops it before the byte fallback)
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.update(euro[:1] + [END_TOKEN_ID] + euro[1:]) == "" and detok.flush() == "€"


def test_fast_path_is_o1_and_never_calls_decode(tokenizer, monkeypatch):
    detok = IncrementalDetokenizer(tokenizer)

    def forbidden(*args, **kwargs):
        raise AssertionError("the byte-fallback fast path must not call tokenizer.decode")

    monkeypatch.setattr(tokenizer, "decode", forbidden)
    ids = tokenizer.encode("a long answer " * 200, add_special_tokens=False)
    for tid in ids:
        detok.update([tid])
    assert detok.text.startswith("a long answer a long")


def test_special_tokens_visible_when_not_skipped(tokenizer):
    ids = tokenizer.encode("hi", add_special_tokens=False) + [END_TOKEN_ID]
    skip = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    keep = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert skip.update(ids) == "hi"
    assert keep.update(ids) == "hi<|end|>"


def test_stop_terminated_drops_the_stop_token_text_and_flushes(tokenizer):
    ids = tokenizer.encode("done", add_special_tokens=False) + [3 + 0xE2, END_TOKEN_ID]
    keep = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert keep.update(ids, stop_terminated=True) == "done\ufffd"  # the open byte run is flushed, <|end|> left out
    assert keep.finished and keep.stop_reason is None
    included = IncrementalDetokenizer(tokenizer, skip_special_tokens=False, include_stop_str_in_output=True)
    assert included.update(ids, stop_terminated=True) == "done\ufffd<|end|>"


def feed_all(detok, ids, chunk=1):
    deltas = [detok.update(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    if not detok.finished:
        deltas.append(detok.flush())
    return "".join(deltas)


def test_stop_string_across_token_boundaries(tokenizer):
    ids = tokenizer.encode("Hello world, stop here please", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["stop here"])
    out = []
    for tid in ids:
        out.append(detok.update([tid]))
        # text that could begin the stop string ("s", "st", "sto", ...) is held back until disambiguated
        assert detok.finished or not any(detok.text.endswith("stop here"[:k]) for k in range(1, 9))
    assert "".join(out) == detok.text == "Hello world, "
    assert detok.finished and detok.stop_reason == "stop here"
    assert detok.update(tokenizer.encode("more", add_special_tokens=False)) == ""
    incl = IncrementalDetokenizer(tokenizer, stop=["stop here"], include_stop_str_in_output=True)
    assert feed_all(incl, ids) == "Hello world, stop here" and incl.stop_reason == "stop here"


def test_stop_string_false_start_is_released(tokenizer):
    ids = tokenizer.encode("stox stop", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["stop!"])
    assert feed_all(detok, ids) == "stox stop" and detok.stop_reason is None


def test_first_completed_stop_string_wins(tokenizer):
    ids = tokenizer.encode("one two three", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["three", "two", "wo t"])
    assert feed_all(detok, ids, chunk=50) == "one " and detok.stop_reason == "two"


def test_stop_string_made_of_a_byte_run(tokenizer):
    ids = tokenizer.encode("price 5€ total", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["€"])
    assert feed_all(detok, ids) == "price 5" and detok.stop_reason == "€"


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_match_reference_on_random_text(tokenizer, include):
    rng = random.Random(99 + include)
    for _ in range(300):
        text = "".join(rng.choice(["a", "b", " ", "ab", "é"]) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = tokenizer.decode(ids)
        stops = ["".join(rng.choice("ab é") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        # the stop string completed first wins (earliest end, then the longest)
        hits = [(full.find(s) + len(s), -len(s), s) for s in stops if s in full]
        if hits:
            end, neg_len, stop = min(hits)
            expected = full[:end] if include else full[: end + neg_len]
        else:
            stop, expected = None, full
        detok = IncrementalDetokenizer(tokenizer, stop=stops, include_stop_str_in_output=include)
        assert feed_all(detok, ids, chunk=rng.randint(1, 3)) == expected, (text, stops)
        assert detok.stop_reason == stop


def test_stop_buffer_holds_only_possible_prefixes():
    buf = StopStringBuffer(["abc", "xyz"])
    assert buf.push("hello a") == "hello "
    assert buf.push("b") == ""
    assert buf.push("d x") == "abd "
    assert buf.push("y", final=True) == "xy"


def test_prompt_context_keeps_the_leading_space(tokenizer):
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    out = tokenizer.encode("Hello world", add_special_tokens=False)[len(prompt) :]
    assert tokenizer.decode(out) == "world"  # HF decode of the new tokens alone strips the leading space
    assert feed_all(IncrementalDetokenizer(tokenizer, prompt), out) == "world"
    assert feed_all(IncrementalDetokenizer(tokenizer, prompt, prompt_context=True), out) == " world"
    chat_prompt = [32010] + prompt + [32007, 32001]  # visible prompt text: the continuation keeps its space too
    assert feed_all(IncrementalDetokenizer(tokenizer, [32001], prompt_context=True), out) == "world"
    assert feed_all(IncrementalDetokenizer(tokenizer, chat_prompt, prompt_context=True), out) == " world"


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE (no byte-fallback decoder): exercises the generic window decoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>"]
    )
    backend.train_from_iterator(["hello world héllo €5 日本語 😀 the quick brown fox jumps"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_generic_path_on_a_byte_level_tokenizer(byte_level_tokenizer, monkeypatch):
    tok = byte_level_tokenizer
    rng = random.Random(5)
    for _ in range(300):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 30))]
        detok = IncrementalDetokenizer(tok, [1, 2])
        assert not detok.is_fast_path
        assert stream(detok, ids, rng) == tok.decode(ids, skip_special_tokens=True)
    # each update decodes a short window, not the whole sequence
    lengths = []
    original = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: lengths.append(len(ids)) or original(ids, **kw))
    detok = IncrementalDetokenizer(tok)
    text = "hello world the quick brown fox " * 30
    for tid in original.__self__.encode(text):
        detok.update([tid])
    assert detok.flush() == "" and detok.text == text
    assert max(lengths) <= 8


def test_generic_path_on_the_project_tokenizer_for_valid_text(tokenizer):
    """The window decoder (used when the fast path does not apply) also handles the sentencepiece layout."""
    from xgenmm.engine.token_text import WindowDecoder

    rng = random.Random(3)
    for _ in range(100):
        ids = tokenizer.encode(random_text(rng, 20), add_special_tokens=False)
        decoder = WindowDecoder(tokenizer, True)
        out = "".join(decoder.feed(ids[i : i + 2]) for i in range(0, len(ids), 2)) + decoder.flush()
        assert out == tokenizer.decode(ids)
