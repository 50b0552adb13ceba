"""Official token ids of xGen-MM v1.5 (Phi-3 tokenizer + the three VLM tokens added by the model code).

Phi-3's tokenizer has 32000 base pieces and 12 added tokens (32000..32011); `update_special_tokens` in the official
code appends `<image>`, `<image placeholder>`, `<|endofchunk|>` (32012..32014), so the model vocabulary is 32015.
"""

UNK_TOKEN_ID = 0
BOS_TOKEN_ID = 1  # never added: add_bos_token is false in the official tokenizer_config.json
EOS_SP_TOKEN_ID = 2  # "</s>", unused by the chat models
NEWLINE_TOKEN_ID = 13  # byte-fallback piece <0x0A>

ENDOFTEXT_TOKEN_ID = 32000  # <|endoftext|>: tokenizer eos and generation_config eos/pad
ASSISTANT_TOKEN_ID = 32001  # <|assistant|>
SYSTEM_TOKEN_ID = 32006  # <|system|>
END_TOKEN_ID = 32007  # <|end|>: end of a turn; the chat models' stop token
USER_TOKEN_ID = 32010  # <|user|>
PAD_TOKEN_ID = 32011  # <pad>: the tokenizer's pad token (left padding)

IMAGE_TOKEN_ID = 32012  # <image>: replaced by the image's vision tokens
IMAGE_PLACEHOLDER_TOKEN_ID = 32013  # <image placeholder>: base model only
ENDOFCHUNK_TOKEN_ID = 32014  # <|endofchunk|>: base model few-shot separator

INITIAL_TOKENIZER_LEN = 32012  # len(Phi-3 tokenizer) before the VLM tokens are added
VOCAB_SIZE = 32015  # logits / embedding rows actually used
EMBEDDING_ROWS = 32064  # rows of embed_tokens.weight / lm_head.weight in the checkpoint (Phi-3 padding)

ENDOFTEXT_TOKEN = "<|endoftext|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
END_TOKEN = "<|end|>"
USER_TOKEN = "<|user|>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER_TOKEN = "<image placeholder>"
ENDOFCHUNK_TOKEN = "<|endofchunk|>"

# The tokens the official model code adds, in this order (ids 32012, 32013, 32014).
VLM_SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_TOKEN, IMAGE_PLACEHOLDER_TOKEN, ENDOFCHUNK_TOKEN)

# Every token whose id is fixed by the official checkpoints: content -> id.
OFFICIAL_TOKEN_IDS: dict[str, int] = {
    ENDOFTEXT_TOKEN: ENDOFTEXT_TOKEN_ID,
    ASSISTANT_TOKEN: ASSISTANT_TOKEN_ID,
    SYSTEM_TOKEN: SYSTEM_TOKEN_ID,
    END_TOKEN: END_TOKEN_ID,
    USER_TOKEN: USER_TOKEN_ID,
    PAD_TOKEN: PAD_TOKEN_ID,
    IMAGE_TOKEN: IMAGE_TOKEN_ID,
    IMAGE_PLACEHOLDER_TOKEN: IMAGE_PLACEHOLDER_TOKEN_ID,
    ENDOFCHUNK_TOKEN: ENDOFCHUNK_TOKEN_ID,
}

# The slow tokenizer's `all_special_tokens` as the official inference code has it (demos, LAVIS, VLMEvalKit:
# `update_special_tokens` adds the VLM tokens, then `tokenizer.eos_token = "<|end|>"`). Only these remove the "▁" the
# slow `LlamaTokenizer(legacy=False)` puts in front of a prompt: a prompt starting with `<image>` has no leading
# 29871, one starting with `<|system|>` or `<|user|>` (added tokens, but not special ones) does.
UPSTREAM_SPECIAL_TOKENS: tuple[str, ...] = ("<s>", END_TOKEN, "<unk>", PAD_TOKEN, *VLM_SPECIAL_TOKENS)
