"""The `transformers` reference: our weights in a stock `Phi3ForCausalLM`, for parity tests and baselines.

This is what users run today (HF `generate(inputs_embeds=...)` on the fused embeddings, as the official remote code
does), so the benchmarks compare against it and the tests check our decoder against it.
"""

from __future__ import annotations

import torch
from torch import nn


def build_hf_language_model(model, attn_implementation: str = "sdpa"):
    """A `transformers.Phi3ForCausalLM` holding `model`'s LM weights (folded 32015-row embedding, head with bias)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    t = model.config.text
    cfg = Phi3Config(
        vocab_size=t.effective_vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        original_max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta,
        rms_norm_eps=t.rms_norm_eps,
        sliding_window=None,  # full attention, as our engine (see docs/architecture.md)
        tie_word_embeddings=False,
        pad_token_id=t.pad_token_id,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
    )
    cfg._attn_implementation = attn_implementation
    dtype = model.embed_weight.dtype
    device = model.embed_weight.device
    with torch.device(device):
        hf = Phi3ForCausalLM(cfg).to(dtype)
    hf.lm_head = nn.Linear(t.hidden_size, t.effective_vocab_size, bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.embed_weight)
        hf.lm_head.weight.copy_(model.lm_head_weight)
        hf.lm_head.bias.copy_(model.lm_head_bias)
        ours = model.language_model.state_dict()
        missing = hf.model.load_state_dict({k: v for k, v in ours.items() if not k.startswith("rotary")}, strict=False)
        unexpected = [k for k in missing.missing_keys if not k.startswith(("embed_tokens", "rotary_emb"))]
        if unexpected or missing.unexpected_keys:
            raise RuntimeError(f"reference model mismatch: missing {unexpected}, unexpected {missing.unexpected_keys}")
    return hf.eval().requires_grad_(False)
