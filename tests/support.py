"""Paths and helpers shared by the test packages (`from tests.support import ...`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
XGENMM_TINY = FIXTURES / "xgenmm-tiny"  # the upstream golden fixtures
TOKENIZER_FIXTURES = FIXTURES / "tokenizer"  # upstream prompt-tokenization golden data
EXAMPLES = REPO / "examples"


def run_example(script: str, *args: str, timeout: float = 300) -> str:
    """Run `examples/<script>` offline on its default tiny random checkpoint; return its stdout (asserting exit 0)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def check_rag_example_output(out: str, caption_line: str) -> None:
    """What both multimodal-RAG examples print: a caption line per image (`caption_line` is its regex, the image file
    name as group 1), the top-2 retrieved images, the usage of the answer (the retrieved images in its prompt), the
    answer."""
    import re

    images = sorted(p.name for p in (EXAMPLES / "images").iterdir())
    captioned = re.findall(caption_line, out, re.M)
    assert sorted(match[0] if isinstance(match, tuple) else match for match in captioned) == images
    retrieved = re.findall(r"^retrieved (\S+) score=", out, re.M)
    assert len(retrieved) == 2 and set(retrieved) <= set(images)
    usage = re.search(r"^usage: prompt=(\d+) completion=(\d+)", out, re.M)
    assert usage and int(usage.group(2)) >= 1
    assert int(usage.group(1)) > 2 * 128  # the two retrieved images are in the answer's prompt
    assert re.search(r"^answer: \S", out, re.M)


def decoder_runs(model, modes, dtype, lengths=(11, 5), block_size=16):
    """Prefill two sequences (`lengths` tokens, one KV block each) through `model`'s decoder once per fused-ops mode
    (`Phi3Decoder.fused_ops`: "off", "on", "auto"): {mode: (hidden states, KV caches)}. For comparing the fused
    small ops with the plain torch path."""
    import torch

    from xgenmm.attention import AttentionMetadata, TorchReferenceBackend, allocate_kv_caches

    cfg = model.config.text
    decoder = model.language_model
    ids = torch.randint(0, 32000, (sum(lengths),), generator=torch.Generator().manual_seed(0))
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32),
        seq_lens=torch.tensor(lengths, dtype=torch.int32), context_lens=torch.zeros(2, dtype=torch.int32),
        block_tables=torch.tensor([[0], [1]], dtype=torch.int32),
        slot_mapping=torch.tensor(list(range(lengths[0])) + list(range(block_size, block_size + lengths[1]))),
        max_query_len=max(lengths), max_seq_len=max(lengths), block_size=block_size,
    )  # fmt: skip
    positions = torch.cat([torch.arange(n) for n in lengths])
    results = {}
    for mode in modes:
        caches = allocate_kv_caches(cfg.num_hidden_layers, 2, block_size, cfg.num_key_value_heads, cfg.head_dim,
                                    dtype, "cpu")  # fmt: skip
        decoder.fused_ops = mode
        try:
            with torch.inference_mode():
                hidden = model.forward_hidden(model.embed_tokens(ids), positions, meta, caches, TorchReferenceBackend())
        finally:
            decoder.fused_ops = "auto"
        results[mode] = (hidden, caches)
    return results


def mixed_engine_requests(n: int, images: list) -> list:
    """Engine-invariant test prompts: a shared system prefix (prefix-cache hits), images of several aspect ratios,
    every fourth request text-only."""
    system = "<|system|>\nYou look at pictures and answer briefly.<|end|>\n"
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append(f"{system}<|user|>\nTell me a story number {i}.<|end|>\n<|assistant|>\n")
        else:
            out.append({"prompt": f"{system}<|user|>\n<image>\nWhat is in picture {i}?<|end|>\n<|assistant|>\n",
                        "multi_modal_data": {"image": images[i % len(images)]}})
    return out


def tokens_and_logprobs(out) -> tuple:
    """Tokens and the float32 logprob of every token: bit-identical only if every row was computed the same way."""
    c = out.outputs[0]
    return tuple(c.token_ids), tuple(c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids))
