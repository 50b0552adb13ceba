"""A real fast tokenizer in the Phi-3 / Llama layout, for random checkpoints.

The official xGen-MM v1.5 repos ship Phi-3's sentencepiece-BPE tokenizer (32000 base pieces + 12 added tokens) and
*not* the three VLM tokens: `xgenmm.tokenizer.load_tokenizer` adds those. This module writes a tokenizer with the
same layout and the same files, so everything downstream (special ids, rstrip, no BOS, byte fallback, incremental
detokenization of multi-byte characters) behaves as with the real one:

* ids 0..2 `<unk>`, `<s>`, `</s>`; ids 3..258 the byte-fallback pieces `<0x00>`..`<0xFF>` (so "\\n" is 13);
* ids 259.. the merged pieces of a small BPE trained (deterministically) on `corpus.TRAINING_TEXT`, then filler
  pseudo-words (unreachable by the merges, but they decode to readable text when a random model samples them),
  then the single characters (printable ASCII and "▁") at the end, as in the Llama vocabulary; 32000 in all;
* ids 32000..32011 Phi-3's added tokens with the official flags (`<|system|>`, `<|user|>`, `<|end|>`,
  `<|assistant|>` and the placeholders have rstrip=True; `</s>` is rstrip and not special).

The pipeline in tokenizer.json (Prepend/Replace normalizer, ByteFallback decoder) is the official one; transformers
5 rebuilds it as `LlamaTokenizer(legacy=False)` (Metaspace, prepend only on the first section) from the vocab and
merges, exactly as it does for the real repo.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from .corpus import TRAINING_TEXT

BASE_VOCAB_SIZE = 32000
NUM_BYTE_PIECES = 256
FIRST_BYTE_ID = 3
SPIECE_UNDERLINE = "▁"

# (id, content, rstrip, special) exactly as in the official tokenizer.json / tokenizer_config.json.
PHI3_ADDED_TOKENS: tuple[tuple[int, str, bool, bool], ...] = (
    (0, "<unk>", False, True),
    (1, "<s>", False, True),
    (2, "</s>", True, False),
    (32000, "<|endoftext|>", False, True),
    (32001, "<|assistant|>", True, True),
    (32002, "<|placeholder1|>", True, True),
    (32003, "<|placeholder2|>", True, True),
    (32004, "<|placeholder3|>", True, True),
    (32005, "<|placeholder4|>", True, True),
    (32006, "<|system|>", True, True),
    (32007, "<|end|>", True, True),
    (32008, "<|placeholder5|>", True, True),
    (32009, "<|placeholder6|>", True, True),
    (32010, "<|user|>", True, True),
    (32011, "<pad>", False, True),
)

# The Phi-3 chat template as shipped in the official tokenizer_config.json.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
SENTENCEPIECE_MODEL_FILE = "tokenizer.model"

_TRAIN_VOCAB_SIZE = 4000
_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"


def _alphabet() -> list[str]:
    """Printable ASCII (space spelled "▁"): every ASCII character is a piece; everything else is byte fallback."""
    return [SPIECE_UNDERLINE] + [chr(c) for c in range(0x21, 0x7F)]


def _train_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    """Train a sentencepiece-style BPE on the embedded corpus; return (merged pieces in merge order, merges)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
    # split=True keeps merges inside words ("▁the", "ing"), like sentencepiece pieces.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=_TRAIN_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=_alphabet(),
    )
    lines = [" ".join(line.split()) for line in TRAINING_TEXT.strip().splitlines()]
    trainer_tok.train_from_iterator([line for line in lines if line], trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    merges: list[tuple[str, str]] = []
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merges.append((left, right))
    pieces: list[str] = []
    seen: set[str] = set(_alphabet())
    for left, right in merges:
        piece = left + right
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    return pieces, merges


def _filler_pieces(count: int, taken: set[str]) -> list[str]:
    """Unique pronounceable pseudo-words ("▁bako", "lemi", ...) that fill the vocabulary up to 32000 entries."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    out: list[str] = []
    n_syll = 2
    while len(out) < count:
        # enumerate all n-syllable words, alternately with and without the word-start marker
        total = len(syllables) ** n_syll
        for prefix in (SPIECE_UNDERLINE, ""):
            for index in range(total):
                parts = []
                rest = index
                for _ in range(n_syll):
                    rest, digit = divmod(rest, len(syllables))
                    parts.append(syllables[digit])
                piece = prefix + "".join(reversed(parts))
                if piece in taken:
                    continue
                taken.add(piece)
                out.append(piece)
                if len(out) == count:
                    return out
        n_syll += 1
    return out


def phi3_tokenizer_json(bpe_model: dict) -> dict:
    """A complete tokenizer.json (as a dict) in the official Phi-3 layout around `bpe_model` (tokenizer.json's
    "model" section: a BPE with byte fallback over 32000 pieces): Phi-3's added tokens with their flags, the
    Prepend/Replace normalizer, no pre-tokenizer, the pass-through post-processor and the byte-fallback decoder."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": tid,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": rstrip,
                "normalized": False,
                "special": special,
            }
            for tid, content, rstrip, special in PHI3_ADDED_TOKENS
        ],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPIECE_UNDERLINE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": bpe_model,
    }


@functools.lru_cache(maxsize=1)
def build_tokenizer_json() -> str:
    """The synthetic tokenizer's complete tokenizer.json text (deterministic; cached per process)."""
    pieces, merges = _train_bpe()
    vocab_list: list[str] = ["<unk>", "<s>", "</s>"] + [_byte_piece(b) for b in range(NUM_BYTE_PIECES)]
    alphabet = _alphabet()
    taken = set(vocab_list) | set(pieces) | set(alphabet)
    n_fill = BASE_VOCAB_SIZE - len(vocab_list) - len(pieces) - len(alphabet)
    if n_fill < 0:  # pragma: no cover - the corpus is far too small for this
        raise RuntimeError("trained BPE vocabulary does not fit in 32000 pieces")
    vocab_list += pieces + _filler_pieces(n_fill, taken) + alphabet
    assert len(vocab_list) == BASE_VOCAB_SIZE and len(set(vocab_list)) == BASE_VOCAB_SIZE
    vocab = {piece: i for i, piece in enumerate(vocab_list)}
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": "<unk>",
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": [f"{left} {right}" for left, right in merges],
    }
    return json.dumps(phi3_tokenizer_json(model), ensure_ascii=False, indent=2)


def _tokenizer_config() -> dict:
    added = {
        str(tid): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": rstrip,
            "single_word": False,
            "special": special,
        }
        for tid, content, rstrip, special in PHI3_ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def _special_tokens_map() -> dict:
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "bos_token": entry("<s>"),
        "eos_token": entry("<|endoftext|>"),
        "pad_token": entry("<pad>"),
        "unk_token": entry("<unk>"),
    }


def _added_tokens() -> dict:
    return {content: tid for tid, content, _, _ in sorted(PHI3_ADDED_TOKENS, key=lambda t: t[1]) if tid >= 32000}


def save_phi3_tokenizer(directory: str | Path, tokenizer_json: str, sentencepiece_model: bytes | None = None) -> list[Path]:
    """Write tokenizer.json (`tokenizer_json`, the text), tokenizer_config.json, special_tokens_map.json,
    added_tokens.json and, when given, the sentencepiece tokenizer.model into `directory`, as the official repos
    ship them. The three VLM tokens are deliberately absent, as in the real repos."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contents: dict[str, str | bytes] = {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(_special_tokens_map(), indent=2) + "\n",
        "added_tokens.json": json.dumps(_added_tokens(), indent=2) + "\n",
    }
    if sentencepiece_model is not None:
        contents["tokenizer.model"] = sentencepiece_model
    paths = []
    for name, data in contents.items():
        path = directory / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
        paths.append(path)
    return paths


def copy_tokenizer_files(source: str | Path, directory: str | Path) -> list[Path]:
    """Copy a tokenizer folder's files (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    added_tokens.json, tokenizer.model where present) into `directory`."""
    import shutil

    source, directory = Path(source), Path(directory)
    missing = [name for name in TOKENIZER_FILES if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source}: missing tokenizer file(s) {missing}")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in (*TOKENIZER_FILES, SENTENCEPIECE_MODEL_FILE):
        if (source / name).is_file():
            paths.append(Path(shutil.copyfile(source / name, directory / name)))
    return paths


def save_random_tokenizer(directory: str | Path) -> list[Path]:
    """Write the synthetic Phi-3-layout tokenizer (see the module docstring) into `directory`."""
    return save_phi3_tokenizer(directory, build_tokenizer_json())
