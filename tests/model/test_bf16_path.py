"""bfloat16 model path (the CUDA default) on CPU: float32 logits, KV cache in the model dtype, and the decoder within
bf16 rounding of transformers' Phi3 in bf16 (RMSNorm / RoPE / head computed as HF does)."""

from __future__ import annotations

import torch

from xgenmm.attention import AttentionMetadata, TorchReferenceBackend, allocate_kv_caches
from xgenmm.checkpoint import load_model
from xgenmm.reference import build_hf_language_model


def _run(model, ids: torch.Tensor):
    cfg = model.config.text
    n = ids.shape[0]
    dtype = model.embed_weight.dtype
    caches = allocate_kv_caches(cfg.num_hidden_layers, 4, 16, cfg.num_key_value_heads, cfg.head_dim, dtype, "cpu")
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
        context_lens=torch.tensor([0], dtype=torch.int32), block_tables=torch.tensor([[2, 0, 3]], dtype=torch.int32),
        slot_mapping=torch.cat([torch.arange(32, 48), torch.arange(0, 16), torch.arange(48, 48 + n - 32)]),
        max_query_len=n, max_seq_len=n, block_size=16,
    )  # fmt: skip
    with torch.inference_mode():
        hidden = model.forward_hidden(model.embed_tokens(ids), torch.arange(n), meta, caches, TorchReferenceBackend())
        return model.compute_logits(hidden), caches


def test_bf16_decoder_logits_float32_and_within_bf16_rounding_of_transformers(tiny_checkpoint):
    ids = torch.randint(0, 32000, (40,), generator=torch.Generator().manual_seed(0))
    logits, hf_logits = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(tiny_checkpoint, "cpu", dtype)
        hf = build_hf_language_model(model, attn_implementation="eager")
        logits[dtype], caches = _run(model, ids)
        with torch.inference_mode():
            hf_logits[dtype] = hf(input_ids=ids[None]).logits[0].float()
        assert logits[dtype].dtype == torch.float32  # sampler input is always float32
        assert caches[0][0].dtype == dtype  # KV cache in the model dtype
        assert bool(caches[0][0].abs().sum() > 0)
    ours, theirs, exact = logits[torch.bfloat16], hf_logits[torch.bfloat16], logits[torch.float32]
    ulp = 2.0 ** (torch.floor(torch.log2(theirs.abs().max())) - 7)  # bf16 spacing at the largest logit
    assert float((ours - theirs).abs().max()) <= 4 * ulp
    assert float((ours - theirs).abs().mean()) <= ulp / 4
    # our bf16 error against fp32 is no worse than transformers' own bf16 error
    ours_err = float((ours - exact).abs().mean())
    hf_err = float((theirs - hf_logits[torch.float32]).abs().mean())
    assert ours_err <= 1.25 * hf_err + 1e-4
    assert ours.argmax(-1).eq(theirs.argmax(-1)).float().mean() >= 0.95
