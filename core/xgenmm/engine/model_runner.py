"""Turns one scheduled step into a flat batch + explicit attention metadata, runs the model, returns logits.

It owns the paged KV cache tensors. Nothing here decides *what* runs (the scheduler does) or *what* is sampled
(the sampler does): the runner only builds tensors, including the image rows to splice over placeholder positions
for whichever part of an image falls inside this step's chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionBackend, AttentionMetadata, allocate_kv_caches, get_attention_backend
from ..attention.base import kv_cache_bytes_per_block
from .sequence import Sequence


@dataclass
class StepBatch:
    """The tensors of one step (kept for introspection and tests)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    image_rows: torch.Tensor | None  # [T_img] rows of the flat batch that take vision tokens
    image_embeds: torch.Tensor | None  # [T_img, hidden]
    logits_rows: torch.Tensor  # [S] last row of each sequence that needs a next token
    sample_seqs: list[Sequence]


def num_kv_blocks_for_budget(model, block_size: int, dtype: torch.dtype, device: torch.device,
                             kv_cache_memory_bytes: int | None, gpu_memory_utilization: float) -> int:
    """How many KV blocks fit: a byte budget on CPU, a fraction of the GPU's free memory on CUDA."""
    cfg = model.config.text
    per_block = kv_cache_bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype)
    if kv_cache_memory_bytes is None:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            used = total - free
            # keep headroom for activations (vision batch + prefill chunk); the rest up to the utilization cap is KV.
            headroom = 2 * 1024**3
            kv_cache_memory_bytes = max(int(total * gpu_memory_utilization) - used - headroom, per_block * 64)
        else:
            kv_cache_memory_bytes = 512 * 1024**2
    return max(int(kv_cache_memory_bytes // per_block), 1)


class ModelRunner:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, block_size: int, num_blocks: int,
                 attention_backend: str | AttentionBackend | None = None):
        cfg = model.config.text
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sliding_window = None  # full attention: see docs/architecture.md ("Sliding window")
        if attention_backend is None or isinstance(attention_backend, str):
            attention_backend = get_attention_backend(attention_backend, device)
        self.backend = attention_backend
        self.kv_caches = allocate_kv_caches(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                            cfg.head_dim, dtype, device)

    @property
    def kv_cache_bytes(self) -> int:
        k, _ = self.kv_caches[0]
        return 2 * len(self.kv_caches) * k.numel() * k.element_size()

    def build_batch(self, scheduled: list[tuple[Sequence, int]], image_embeds: dict[int, list[torch.Tensor]]) -> StepBatch:
        """scheduled: (sequence, number of new tokens) pairs; image_embeds: seq_id -> vision tokens per image."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        ctx_lens: list[int] = []
        img_rows: list[torch.Tensor] = []
        img_parts: list[torch.Tensor] = []
        logits_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        max_blocks = 1
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            end = start + n
            offset = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            pos = start
            while pos < end:  # one slice per block
                stop = min(end, (pos // bs + 1) * bs)
                base = table[pos // bs] * bs
                slots.extend(range(base + pos % bs, base + pos % bs + (stop - pos)))
                pos = stop
            for span in seq.image_spans:
                lo, hi = max(start, span.start), min(end, span.end)
                if lo < hi:
                    img_rows.append(torch.arange(offset + lo - start, offset + hi - start))
                    img_parts.append(image_embeds[seq.seq_id][span.image_index][lo - span.start : hi - span.start])
            qsl.append(len(ids))
            seq_lens.append(end)
            ctx_lens.append(start)
            max_blocks = max(max_blocks, len(table))
            if end == seq.num_tokens:
                logits_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        tables = torch.zeros(len(scheduled), max_blocks, dtype=torch.int32)
        for i, (seq, _) in enumerate(scheduled):
            if seq.block_table:
                tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens),
            block_size=bs,
            sliding_window=self.sliding_window,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
            context_lens_cpu=ctx_lens,
        )
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            image_rows=torch.cat(img_rows).to(dev) if img_rows else None,
            image_embeds=torch.cat(img_parts).to(dev) if img_parts else None,
            logits_rows=torch.tensor(logits_rows, dtype=torch.int64, device=dev),
            sample_seqs=sample_seqs,
        )

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Run one step; returns float32 logits [len(batch.sample_seqs), vocab]."""
        from ..model.xgenmm import fuse_embeddings

        embeds = fuse_embeddings(self.model, batch.input_ids, batch.image_rows, batch.image_embeds)
        hidden = self.model.forward_hidden(embeds, batch.positions, batch.meta, self.kv_caches, self.backend)
        if batch.logits_rows.numel() == 0:
            return hidden.new_empty(0, self.model.vocab_size, dtype=torch.float32)
        return self.model.compute_logits(hidden.index_select(0, batch.logits_rows))

    @torch.inference_mode()
    def encode_images(self, images) -> list[torch.Tensor]:
        return self.model.encode_images(images)
