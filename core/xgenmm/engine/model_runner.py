"""Turns one scheduled step into a flat batch + explicit attention metadata, runs the model, returns logits.

It owns the paged KV cache tensors. Nothing here decides *what* runs (the scheduler does) or *what* is sampled
(the sampler does): the runner only builds tensors, including the image rows to splice over placeholder positions
for whichever part of an image falls inside this step's chunk.

On CUDA with a capturable attention backend (Triton), pure-decode steps are padded to a bucket and replayed as CUDA
graphs captured at startup (`cuda_graphs.py`); every other step, and everything on CPU, runs eagerly as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..attention import AttentionBackend, AttentionMetadata, allocate_kv_caches, get_attention_backend
from ..attention.base import kv_cache_bytes_per_block
from .cuda_graphs import (
    DecodeBuffers,
    DecodeGraphs,
    StaticDecodeBatch,
    bucket_for,
    cuda_graph_blocker,
    decode_buckets,
    decode_step_blocker,
)
from .sequence import Sequence
from .vision_stream import PendingImageEmbeds, VisionStream

logger = logging.getLogger("xgenmm.engine")


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
            kv_cache_memory_bytes = default_cpu_kv_cache_bytes(per_block // block_size)
    return max(int(kv_cache_memory_bytes // per_block), 1)


CPU_KV_CACHE_TOKENS = 16384  # e.g. 16 concurrent requests with a 5-crop image each (~700 prompt tokens) and answers
CPU_KV_CACHE_MIN_BYTES = 512 * 1024**2
CPU_KV_CACHE_MAX_BYTES = 4 * 1024**3


def default_cpu_kv_cache_bytes(bytes_per_token: int) -> int:
    """The CPU KV pool when none is given: room for CPU_KV_CACHE_TOKENS tokens, between 512 MiB and 4 GiB, and at
    most a quarter of the memory available now (never below 512 MiB). A fixed 512 MiB held only ~1,300 tokens of the
    full model (384 KiB per token in bf16), two image requests, so batching turned into preemption."""
    want = min(max(bytes_per_token * CPU_KV_CACHE_TOKENS, CPU_KV_CACHE_MIN_BYTES), CPU_KV_CACHE_MAX_BYTES)
    available = _available_memory_bytes()
    if available is not None:
        want = min(want, max(available // 4, CPU_KV_CACHE_MIN_BYTES))
    return want


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class ModelRunner:
    """`cuda_graphs`: None = on when the device is CUDA and the backend is capturable (False = `enforce_eager`);
    graphs cover decode batches up to `max_num_seqs` (default 256, the engine's CUDA default) and contexts up to
    `max_model_len` (default: the model's); `capture_cuda_graphs_at_startup=False` captures each bucket lazily."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, block_size: int, num_blocks: int,
                 attention_backend: str | AttentionBackend | None = None, *, max_num_seqs: int | None = None,
                 max_model_len: int | None = None, cuda_graphs: bool | None = None,
                 capture_cuda_graphs_at_startup: bool = True):
        cfg = model.config.text
        self.model = model
        self.device = device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sliding_window = None  # full attention: see docs/architecture.md ("Sliding window")
        if attention_backend is None or isinstance(attention_backend, str):
            attention_backend = get_attention_backend(attention_backend, device)
        self.backend = attention_backend
        self.kv_caches = allocate_kv_caches(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                            cfg.head_dim, dtype, device)
        self.max_num_seqs = max_num_seqs or 256
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_blocks_per_seq = -(-self.max_model_len // block_size)
        self.vision_stream = VisionStream(device)
        self.decode_graphs: DecodeGraphs | None = None
        self.cuda_graphs_disabled_reason = cuda_graph_blocker(enabled=cuda_graphs is not False, device=device,
                                                              backend=self.backend)
        if self.cuda_graphs_disabled_reason is None:
            self._setup_cuda_graphs(capture_cuda_graphs_at_startup)

    def _setup_cuda_graphs(self, capture_now: bool) -> None:
        buckets = decode_buckets(self.max_num_seqs)
        buffers = DecodeBuffers(buckets[-1], self.max_blocks_per_seq, self.block_size, self.device)
        self.decode_graphs = DecodeGraphs(self._decode_forward, buffers, buckets, self.max_model_len,
                                          self.model.vocab_size)
        if not capture_now:
            return
        try:
            with torch.inference_mode():
                self.decode_graphs.capture_all()
            stats = self.decode_graphs.stats
            logger.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s", len(stats.captured), buckets[0],
                        buckets[-1], stats.capture_seconds)
        except Exception as exc:  # keep serving eagerly rather than not at all
            logger.exception("CUDA graph capture failed; decode runs eagerly")
            self.disable_cuda_graphs(f"capture failed: {type(exc).__name__}: {exc}")

    def disable_cuda_graphs(self, reason: str = "disabled") -> None:
        """Run every later step eagerly (e.g. to measure the eager path on the same engine)."""
        self.decode_graphs = None
        self.cuda_graphs_disabled_reason = reason

    def cuda_graph_stats(self) -> dict:
        """Whether decode steps replay CUDA graphs, which buckets are captured, how many steps replayed / ran eager."""
        g = self.decode_graphs
        if g is None:
            return {"enabled": False, "reason": self.cuda_graphs_disabled_reason}
        return {"enabled": True, "buckets": list(g.buckets), "captured": sorted(g.stats.captured),
                "replays": g.stats.replays, "capture_seconds": round(g.stats.capture_seconds, 3),
                "eager_steps": dict(g.stats.eager_steps)}

    @property
    def kv_cache_bytes(self) -> int:
        k, _ = self.kv_caches[0]
        return 2 * len(self.kv_caches) * k.numel() * k.element_size()

    def build_batch(self, scheduled: list[tuple[Sequence, int]],
                    image_embeds: dict[int, list[torch.Tensor]]) -> StepBatch | StaticDecodeBatch:
        """scheduled: (sequence, number of new tokens) pairs; image_embeds: seq_id -> vision tokens per image.

        A pure-decode step that a captured CUDA graph can serve comes back as a `StaticDecodeBatch`."""
        graphs = self.decode_graphs
        if graphs is not None:
            reason = decode_step_blocker(scheduled, graphs.buffers.max_batch, graphs.buffers.max_blocks)
            if reason is None:
                return graphs.buffers.load(scheduled, bucket_for(len(scheduled), graphs.buckets))
            graphs.stats.eager_steps[reason] += 1
        return self._build_eager_batch(scheduled, image_embeds)

    def build_static_decode_batch(self, scheduled: list[tuple[Sequence, int]], bucket: int | None = None,
                                  max_batch: int | None = None) -> StaticDecodeBatch:
        """The padded static form of a pure-decode step on any device (what a CUDA graph replays; on CPU it runs
        eagerly through the attention backend, which is how the padding is tested)."""
        reason = decode_step_blocker(scheduled, max_batch or self.max_num_seqs, self.max_blocks_per_seq)
        if reason is not None:
            raise ValueError(f"not a static decode step: {reason}")
        if self.decode_graphs is not None:
            buffers, buckets = self.decode_graphs.buffers, self.decode_graphs.buckets
        else:
            size = max_batch or self.max_num_seqs
            buffers = getattr(self, "_eager_decode_buffers", None)
            if buffers is None or buffers.max_batch < size:
                buffers = DecodeBuffers(size, self.max_blocks_per_seq, self.block_size, self.device)
                self._eager_decode_buffers = buffers
            buckets = decode_buckets(buffers.max_batch)
        return buffers.load(scheduled, bucket or bucket_for(len(scheduled), buckets))

    def _build_eager_batch(self, scheduled: list[tuple[Sequence, int]],
                           image_embeds: dict[int, list[torch.Tensor]]) -> StepBatch:
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
    def execute(self, batch: StepBatch | StaticDecodeBatch) -> torch.Tensor:
        """Run one step; returns float32 logits [len(batch.sample_seqs), vocab]."""
        from ..model.xgenmm import fuse_embeddings

        if isinstance(batch, StaticDecodeBatch):
            if self.decode_graphs is not None and batch.meta.block_tables.device.type == "cuda":
                logits = self.decode_graphs.replay(batch)
            else:
                logits = self._decode_forward(batch.input_ids, batch.positions, batch.meta)
            return self._select_rows(logits, batch)
        embeds = fuse_embeddings(self.model, batch.input_ids, batch.image_rows, batch.image_embeds)
        hidden = self.model.forward_hidden(embeds, batch.positions, batch.meta, self.kv_caches, self.backend)
        if batch.logits_rows.numel() == 0:
            return hidden.new_empty(0, self.model.vocab_size, dtype=torch.float32)
        return self.model.compute_logits(hidden.index_select(0, batch.logits_rows))

    def _decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Embedding -> decoder -> LM head over every row of a padded decode batch (what a CUDA graph holds)."""
        hidden = self.model.forward_hidden(self.model.embed_tokens(input_ids), positions, meta, self.kv_caches,
                                           self.backend)  # fmt: skip
        return self.model.compute_logits(hidden)

    def _select_rows(self, logits: torch.Tensor, batch: StaticDecodeBatch) -> torch.Tensor:
        rows = batch.logits_rows
        if len(rows) == batch.num_seqs:  # every sequence samples: rows 0..n-1, no index tensor needed
            return logits[: batch.num_seqs]
        if not rows:
            return logits.new_empty(0, logits.shape[1])
        return logits.index_select(0, torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True))

    @torch.inference_mode()
    def encode_images(self, images) -> list[torch.Tensor]:
        return self.model.encode_images(images)

    def encode_images_async(self, images) -> PendingImageEmbeds:
        """Start encoding on the vision side stream (CUDA) so it overlaps the decode steps queued after it; on CPU
        it encodes now. `.result()` makes the caller's stream wait for it and returns the tokens per image."""
        return self.vision_stream.submit(self.encode_images, images)
