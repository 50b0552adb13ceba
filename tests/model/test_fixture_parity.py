"""Faithfulness: our model reproduces the upstream reference outputs stored in tests/fixtures/xgenmm-tiny.

Internals (pixels, SigLIP features, perceiver mask, vision tokens, hidden states, logits) and the public API
(`LLM.generate` greedy tokens and logprobs) are checked against every fixture case.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xgenmm.attention import AttentionMetadata, TorchReferenceBackend, allocate_kv_caches
from xgenmm.checkpoint import load_model
from xgenmm.multimodal.image_processing import ImageProcessor
from xgenmm.model.vision import rechunk_grid_features
from xgenmm.model.xgenmm import fuse_embeddings
from xgenmm.multimodal.fusion import fuse_prompt

ATOL_VISION = 1e-4
ATOL_LOGITS = 1e-3


@pytest.fixture(scope="module")
def model(fixture_dir):
    return load_model(fixture_dir / "checkpoint", "cpu", "float32")


@pytest.fixture(scope="module")
def processor(fixture_dir):
    return ImageProcessor.from_pretrained(fixture_dir / "checkpoint")


def _image_expected(fixture_dir, image_path: str) -> dict:
    name = image_path.split("/")[-1].removesuffix(".png")
    return load_file(fixture_dir / "expected" / "images" / f"{name}.safetensors")


def _all_images(fixture_cases):
    seen = {}
    for case in fixture_cases["cases"]:
        for s in case["samples"]:
            for k, path in enumerate(s["images"]):
                seen.setdefault(path, (tuple(s["image_sizes_wh"][k]), tuple(s["anyres_grid_wh"][k])))
    return sorted(seen.items())


def test_pixels_siglip_mask_and_vision_tokens(model, processor, fixture_dir, fixture_cases):
    for path, (size, grid) in _all_images(fixture_cases):
        expected = _image_expected(fixture_dir, path)
        img = processor(Image.open(fixture_dir / path))
        assert img.image_size == size and img.grid == grid
        assert torch.equal(img.pixel_values, (expected["pixel_values_u8"].float() / 255 - 0.5) / 0.5), path
        feats = model.vision.vision_encoder(pixel_values=img.pixel_values).last_hidden_state
        torch.testing.assert_close(feats, expected["siglip_last_hidden_state"], atol=ATOL_VISION, rtol=0)
        npw, nph = grid
        _, mask = rechunk_grid_features(feats[1:], size, npw, nph, 27)
        full_mask = torch.cat((torch.ones(1, 729, dtype=torch.bool), mask))
        assert torch.equal(full_mask, expected["perceiver_mask"].bool()), path
        tokens = model.encode_images([img])[0]
        torch.testing.assert_close(tokens, expected["vision_tokens"], atol=ATOL_VISION, rtol=0)


def _prefill(model, ids, rows, vision, num_extra=0):
    cfg = model.config.text
    total, bs = len(ids), 16
    nb = (total + num_extra + bs - 1) // bs
    caches = allocate_kv_caches(cfg.num_hidden_layers, nb, bs, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu")

    def meta(ctx, q):
        return AttentionMetadata(
            query_start_loc=torch.tensor([0, q], dtype=torch.int32), seq_lens=torch.tensor([ctx + q], dtype=torch.int32),
            context_lens=torch.tensor([ctx], dtype=torch.int32), block_tables=torch.arange(nb, dtype=torch.int32)[None],
            slot_mapping=torch.arange(ctx, ctx + q), max_query_len=q, max_seq_len=ctx + q, block_size=bs)

    emb = fuse_embeddings(model, torch.tensor(ids), rows, vision)
    hidden, states = model.forward_hidden(emb, torch.arange(total), meta(0, total), caches, TorchReferenceBackend(), True)
    return hidden, states, caches, meta


@pytest.mark.parametrize("case_name", ["single_2x2", "single_1x3", "single_3x1", "single_2x1", "single_1x2",
                                       "single_small_1x2", "interleave_two", "text_only", "image_first_no_template",
                                       "batch2"])
def test_logits_and_greedy_tokens_internals(model, processor, fixture_dir, fixture_cases, case_name):
    case = next(c for c in fixture_cases["cases"] if c["name"] == case_name)
    expected = load_file(fixture_dir / case["expected"])
    for b, sample in enumerate(case["samples"]):
        images = [processor(Image.open(fixture_dir / p)) for p in sample["images"]]
        fused = fuse_prompt(sample["input_ids"], images)
        assert len(fused.token_ids) == sample["fused_length"]
        vision = model.encode_images(images)
        for j, tokens in enumerate(vision):
            torch.testing.assert_close(tokens, expected[f"vision_tokens.s{b}.i{j}"], atol=ATOL_VISION, rtol=0)
        rows = torch.cat([torch.arange(s.start, s.end) for s in fused.image_spans]) if images else None
        hidden, states, caches, meta = _prefill(model, fused.token_ids, rows, torch.cat(vision) if images else None, 8)
        if "hidden_states" in expected:
            for ours, ref in zip((states[0], states[1], states[-1]), expected["hidden_states"]):
                torch.testing.assert_close(ours, ref, atol=ATOL_LOGITS, rtol=0)
            all_logits = model.compute_logits(hidden)
            assert torch.equal(all_logits.argmax(-1), expected["pos_argmax"])
            torch.testing.assert_close(torch.logsumexp(all_logits, -1), expected["pos_logsumexp"], atol=ATOL_LOGITS, rtol=0)
        logits = model.compute_logits(hidden[-1:])[0]
        assert logits.shape[0] == 32015
        torch.testing.assert_close(logits, expected["last_logits"][b], atol=ATOL_LOGITS, rtol=0)
        # greedy decode with the paged KV cache, step by step against the recorded top-16 logits
        generated, pos = [], len(fused.token_ids)
        for step in range(8):
            top = torch.topk(logits, 16)
            assert torch.equal(top.indices, expected["step_topk_ids"][b, step])
            torch.testing.assert_close(top.values, expected["step_topk_logits"][b, step], atol=ATOL_LOGITS, rtol=0)
            token = int(logits.argmax())
            generated.append(token)
            h = model.forward_hidden(model.embed_tokens(torch.tensor([token])), torch.tensor([pos]), meta(pos, 1), caches,
                                     TorchReferenceBackend())
            logits = model.compute_logits(h)[0]
            pos += 1
        assert generated == sample["generated_ids"]
