"""Our flat-batch paged Phi-3 decoder against `transformers.Phi3ForCausalLM` on the same random weights."""

from __future__ import annotations

import torch

from xgenmm.attention import AttentionMetadata, TorchReferenceBackend, allocate_kv_caches
from xgenmm.checkpoint import load_model
from xgenmm.reference import build_hf_language_model


def _meta(ctx: list[int], q: list[int], tables: torch.Tensor, bs: int) -> tuple[AttentionMetadata, torch.Tensor]:
    qsl = [0]
    slots = []
    for b, (c, n) in enumerate(zip(ctx, q)):
        qsl.append(qsl[-1] + n)
        for p in range(c, c + n):
            slots.append(int(tables[b, p // bs]) * bs + p % bs)
    seq_lens = [c + n for c, n in zip(ctx, q)]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        context_lens=torch.tensor(ctx, dtype=torch.int32), block_tables=tables, slot_mapping=torch.tensor(slots),
        max_query_len=max(q), max_seq_len=max(seq_lens), block_size=bs)
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, q)])
    return meta, positions


def test_decoder_matches_transformers_phi3_prefill_chunks_and_decode(tiny_checkpoint):
    torch.manual_seed(0)
    model = load_model(tiny_checkpoint, "cpu", "float32")
    hf = build_hf_language_model(model, attn_implementation="eager")
    cfg = model.config.text
    lengths = [37, 70]
    ids = [torch.randint(0, 32015, (n,)) for n in lengths]
    with torch.no_grad():
        ref = [hf(input_ids=x[None]).logits[0] for x in ids]

    bs, nb = 16, 16
    caches = allocate_kv_caches(cfg.num_hidden_layers, nb, bs, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")
    perm = torch.randperm(nb, dtype=torch.int32)  # scattered physical blocks
    tables = torch.stack([perm[:8], perm[8:]])
    backend = TorchReferenceBackend()
    # step 1: both prompts chunked (20 and 33 tokens); step 2: the rest of each, mixed in one flat batch;
    # step 3: one decode token each.
    chunks = [(0, 20), (0, 33)], [(20, lengths[0] - 20 - 1), (33, lengths[1] - 33 - 1)], [(lengths[0] - 1, 1), (lengths[1] - 1, 1)]
    for step in chunks:
        ctx = [c for c, _ in step]
        q = [n for _, n in step]
        meta, positions = _meta(ctx, q, tables, bs)
        tokens = torch.cat([ids[b][c : c + n] for b, (c, n) in enumerate(step)])
        with torch.no_grad():
            hidden = model.forward_hidden(model.embed_tokens(tokens), positions, meta, caches, backend)
            logits = model.compute_logits(hidden)
        offset = 0
        for b, (c, n) in enumerate(step):
            torch.testing.assert_close(logits[offset : offset + n], ref[b][c : c + n], atol=1e-5, rtol=0)
            offset += n
