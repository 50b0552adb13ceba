"""bf16 fidelity gate: how far a bf16 pipeline's logits are from the same pipeline in float32, teacher-forced.

For every sample (a fused prompt with its images, plus a continuation: the float32 greedy tokens), both dtypes of a
pipeline score the whole sequence in one pass; at every continuation position we compare the bf16 logits with the
float32 ones: top-1 agreement (same argmax), max and mean |logit error|. Two pipelines, on the same weights:

* `ours`: `load_model` (our decoder, our CPU kernels / oneDNN linears, the engine's default attention backend);
* `transformers`: what users run today, as upstream does: the vision tower with ATen linears and a stock
  `transformers.Phi3ForCausalLM` (`reference.build_hf_language_model`, SDPA attention) on the fused embeddings.

Random weights give small logit margins, so the absolute agreement says little; the gate is that ours is no worse
than transformers' own bf16 on the same inputs (`gate_passes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..attention import AttentionMetadata, allocate_kv_caches, get_attention_backend
from ..model.xgenmm import fuse_embeddings
from ..multimodal.fusion import fuse_prompt


@dataclass
class Sample:
    prompt_ids: list[int]  # text ids, one IMAGE_TOKEN_ID per image (before fusion)
    images: list  # ProcessedImage, in prompt order
    continuation: list[int]  # the float32 greedy tokens that follow the prompt


@dataclass
class Agreement:
    positions: int
    top1_agreement: float
    max_logit_error: float
    mean_logit_error: float

    def to_dict(self) -> dict:
        return asdict(self)


def _fused_embeddings(model, sample: Sample) -> torch.Tensor:
    fused = fuse_prompt(sample.prompt_ids, sample.images)
    ids = torch.tensor(fused.token_ids + sample.continuation)
    rows = vision = None
    if sample.images:
        rows = torch.cat([torch.arange(s.start, s.end) for s in fused.image_spans])
        vision = torch.cat(model.encode_images(sample.images))
    return fuse_embeddings(model, ids, rows, vision)


@torch.inference_mode()
def ours_logits(model, sample: Sample, block_size: int = 16) -> torch.Tensor:
    """[len(continuation), vocab] float32 logits at the positions that predict the continuation (our model)."""
    embeds = _fused_embeddings(model, sample)
    t = embeds.shape[0]
    cfg = model.config.text
    nb = -(-t // block_size)
    caches = allocate_kv_caches(cfg.num_hidden_layers, nb, block_size, cfg.num_key_value_heads, cfg.head_dim,
                                embeds.dtype, "cpu")
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, t], dtype=torch.int32), seq_lens=torch.tensor([t], dtype=torch.int32),
        context_lens=torch.tensor([0], dtype=torch.int32), block_tables=torch.arange(nb, dtype=torch.int32)[None],
        slot_mapping=torch.arange(t), max_query_len=t, max_seq_len=t, block_size=block_size,
        query_start_loc_cpu=[0, t], seq_lens_cpu=[t], context_lens_cpu=[0])
    hidden = model.forward_hidden(embeds, torch.arange(t), meta, caches, get_attention_backend(None, "cpu"))
    n = len(sample.continuation)
    return model.compute_logits(hidden[t - n - 1 : t - 1])


@torch.inference_mode()
def transformers_logits(model, hf, sample: Sample) -> torch.Tensor:
    """The same positions through the upstream-style pipeline (`model` loaded with linear_kernel="torch")."""
    embeds = _fused_embeddings(model, sample)
    t, n = embeds.shape[0], len(sample.continuation)
    return hf(inputs_embeds=embeds[None]).logits[0, t - n - 1 : t - 1].float()


def agreement(bf16: list[torch.Tensor], fp32: list[torch.Tensor]) -> Agreement:
    a, b = torch.cat(bf16), torch.cat(fp32)
    err = (a - b).abs()
    return Agreement(positions=a.shape[0], top1_agreement=float(a.argmax(-1).eq(b.argmax(-1)).float().mean()),
                     max_logit_error=float(err.max()), mean_logit_error=float(err.mean()))


def measure(checkpoint, samples: list[Sample]) -> dict[str, Agreement]:
    """{"ours": ..., "transformers": ...}: each pipeline's bf16 against its own float32, on the same weights."""
    from ..checkpoint import load_model
    from ..reference import build_hf_language_model

    logits: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(checkpoint, "cpu", dtype)
        logits["ours", dtype] = [ours_logits(model, s) for s in samples]
        del model
        upstream = load_model(checkpoint, "cpu", dtype, linear_kernel="torch")
        hf = build_hf_language_model(upstream)
        logits["transformers", dtype] = [transformers_logits(upstream, hf, s) for s in samples]
        del upstream, hf
    return {name: agreement(logits[name, torch.bfloat16], logits[name, torch.float32])
            for name in ("ours", "transformers")}


def gate_passes(result: dict[str, Agreement], mean_slack: float = 1.1) -> bool:
    """Ours no worse than transformers: top-1 agreement at least as high (one position of slack, since a single
    flipped near-tie decides it) and mean logit error at most `mean_slack` x theirs."""
    ours, theirs = result["ours"], result["transformers"]
    return (ours.top1_agreement >= theirs.top1_agreement - 1.0 / max(ours.positions, 1)
            and ours.mean_logit_error <= mean_slack * theirs.mean_logit_error)


def fixture_samples(fixture_dir) -> list[Sample]:
    """The upstream golden fixtures: every case's prompt and images, continued by upstream's float32 greedy tokens."""
    import json
    from pathlib import Path

    from PIL import Image

    from ..multimodal.image_processing import ImageProcessor

    fixture_dir = Path(fixture_dir)
    processor = ImageProcessor.from_pretrained(fixture_dir / "checkpoint")
    cases = json.loads((fixture_dir / "cases.json").read_text())["cases"]
    return [Sample(s["input_ids"], [processor(Image.open(fixture_dir / p)) for p in s["images"]], s["generated_ids"])
            for case in cases for s in case["samples"]]
