"""Pure-decode steps replayed as CUDA graphs over padded, static input buffers.

A decode step is one new token per sequence, so its shapes depend only on the number of sequences. The runner pads
that number up to a bucket (1, 2, 4, 8, 16, 24, ... up to max_num_seqs), writes the step into static buffers, and
replays the graph captured for the bucket: embedding -> 32 layers -> final norm -> LM head, one launch from the
host instead of ~400-1200 kernel launches.

Padding follows the Triton backend's contract (`attention/triton_backend.py`): padding sequences have query length 0
and seq_len 0 (their programs exit at once), padding token rows belong to no sequence, have slot -1 (never stored),
token id 0 and position 0; their outputs are garbage and never read. Block tables are sized for max_model_len. The
split-KV choice is baked into a graph, so graphs are captured with `max_seq_len = max_model_len` (the split kernel
is correct at any length).

Device-agnostic (tested on CPU in eager mode): `decode_buckets`, `bucket_for`, `backend_supports_cuda_graphs`,
`cuda_graph_blocker` / `should_use_cuda_graph` (the decision), `DecodeBuffers` (static buffers + pinned host
staging) and `StaticDecodeBatch` (padded metadata over them). CUDA-only: `DecodeGraphs` (capture / replay).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence as SequenceType

import numpy as np
import torch

from ..attention.base import AttentionMetadata
from .sequence import Sequence

# Backends whose forward has fixed launch shapes for padded decode metadata and never syncs with the host.
CAPTURABLE_BACKENDS = frozenset({"triton"})


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8 up to `max_num_seqs` (which is always included)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def bucket_for(num_seqs: int, buckets: SequenceType[int]) -> int | None:
    """The smallest bucket holding `num_seqs` sequences, None when none does."""
    i = bisect.bisect_left(buckets, num_seqs)
    return buckets[i] if i < len(buckets) else None


def backend_supports_cuda_graphs(backend) -> bool:
    """A backend may declare `supports_cuda_graphs`; otherwise the known capturable backends by name."""
    flag = getattr(backend, "supports_cuda_graphs", None)
    if flag is not None:
        return bool(flag)
    return getattr(backend, "name", None) in CAPTURABLE_BACKENDS


def _in_image(seq: Sequence, pos: int) -> bool:
    spans = seq.image_spans
    if not spans or spans[-1].end <= pos:  # the common case: generated tokens follow every image
        return False
    return any(span.start <= pos < span.end for span in spans)


# Why a step runs eagerly (the keys of `DecodeGraphStats.eager_steps`).
EMPTY_STEP = "empty step"
BATCH_TOO_LARGE = "batch larger than the largest bucket"
NOT_PURE_DECODE = "not a pure decode step"
IMAGE_ROW = "image row in the step"
TABLE_TOO_LONG = "block table longer than the static buffer"


def decode_step_blocker(scheduled: SequenceType[tuple[Sequence, int]], max_batch: int, max_blocks: int) -> str | None:
    """Why this step cannot run as a padded static decode batch (None = it can): every sequence has exactly one
    new token, none of them is an image position, and the batch and block tables fit the static buffers."""
    if not scheduled:
        return EMPTY_STEP
    if len(scheduled) > max_batch:
        return BATCH_TOO_LARGE
    for seq, n in scheduled:
        if n != 1:
            return NOT_PURE_DECODE
        if _in_image(seq, seq.num_computed_tokens):
            return IMAGE_ROW
        if len(seq.block_table) > max_blocks:
            return TABLE_TOO_LONG
    return None


def cuda_graph_blocker(
    *,
    enabled: bool,
    device: torch.device | str,
    backend,
    scheduled: SequenceType[tuple[Sequence, int]] | None = None,
    max_batch: int = 0,
    max_blocks: int = 0,
) -> str | None:
    """Why a step would NOT be replayed as a CUDA graph (None = it would): graphs enabled, a CUDA device, a
    capturable backend, then (unless `scheduled` is None: static conditions only) `decode_step_blocker`."""
    if not enabled:
        return "CUDA graphs disabled"
    if torch.device(device).type != "cuda":
        return "not on CUDA"
    if not backend_supports_cuda_graphs(backend):
        return f"attention backend {getattr(backend, 'name', type(backend).__name__)!r} is not capturable"
    if scheduled is None:
        return None
    return decode_step_blocker(scheduled, max_batch, max_blocks)


def should_use_cuda_graph(**kwargs) -> bool:
    """`cuda_graph_blocker(...) is None`."""
    return cuda_graph_blocker(**kwargs) is None


@dataclass
class StaticDecodeBatch:
    """One pure-decode step padded to `bucket` rows, as views of the static buffers (valid until the next load)."""

    bucket: int
    num_seqs: int
    input_ids: torch.Tensor  # [bucket] int64; padding rows hold 0
    positions: torch.Tensor  # [bucket] int64; padding rows hold 0
    meta: AttentionMetadata  # padded; max_seq_len is the real one (a graph was captured with its own bound)
    logits_rows: list[int]  # rows (< num_seqs) whose sequence needs a next token, in order
    sample_seqs: list[Sequence]
    image_rows: None = None  # StepBatch compatibility: a decode step never carries image rows
    image_embeds: None = None


class DecodeBuffers:
    """Static device buffers for padded decode steps, plus host staging (pinned on CUDA; the buffers themselves
    on CPU). `load` fills the staging from the scheduled sequences and copies `[:bucket]` to the device."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, device: torch.device | str):
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"

        def pair(shape, dtype, fill=0):
            dev = torch.full(shape, fill, dtype=dtype, device=self.device)
            host = torch.full(shape, fill, dtype=dtype, pin_memory=True) if on_cuda else dev
            return dev, host, host.numpy()

        self.input_ids, self._ids_h, self._ids = pair((max_batch,), torch.int64)
        self.positions, self._pos_h, self._pos = pair((max_batch,), torch.int64)
        self.slot_mapping, self._slots_h, self._slots = pair((max_batch,), torch.int64, -1)
        self.query_start_loc, self._qsl_h, self._qsl = pair((max_batch + 1,), torch.int32)
        self.seq_lens, self._lens_h, self._lens = pair((max_batch,), torch.int32)
        self.context_lens, self._ctx_h, self._ctx = pair((max_batch,), torch.int32)
        self.block_tables, self._bt_h, self._bt = pair((max_batch, max_blocks), torch.int32)
        self._pairs = [
            (self.input_ids, self._ids_h, 0), (self.positions, self._pos_h, 0), (self.slot_mapping, self._slots_h, 0),
            (self.query_start_loc, self._qsl_h, 1), (self.seq_lens, self._lens_h, 0),
            (self.context_lens, self._ctx_h, 0), (self.block_tables, self._bt_h, 0),
        ]  # fmt: skip
        self._copied: torch.cuda.Event | None = None  # last H2D copy: staging may be rewritten once it is done

    def _begin_write(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # normally long done (each step ends with the sampler's device->host read)

    def _upload(self, bucket: int) -> None:
        if self.device.type != "cuda":
            return
        for dev, host, extra in self._pairs:
            dev[: bucket + extra].copy_(host[: bucket + extra], non_blocking=True)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()

    def load(self, scheduled: SequenceType[tuple[Sequence, int]], bucket: int) -> StaticDecodeBatch:
        """Write one pure-decode step (one new token per sequence) padded to `bucket` rows."""
        n = len(scheduled)
        if not 0 < n <= bucket <= self.max_batch:
            raise ValueError(f"cannot pad {n} sequences to bucket {bucket} (max {self.max_batch})")
        self._begin_write()
        bs = self.block_size
        ids, pos, slots, logits_rows, sample_seqs = [], [], [], [], []
        bt = self._bt
        for i, (seq, _) in enumerate(scheduled):
            p = seq.num_computed_tokens
            table = seq.block_table
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            bt[i, : len(table)] = table
            if p + 1 == seq.num_tokens:
                logits_rows.append(i)
                sample_seqs.append(seq)
        lens = [p + 1 for p in pos]
        self._ids[:n], self._ids[n:bucket] = ids, 0
        self._pos[:n], self._pos[n:bucket] = pos, 0
        self._slots[:n], self._slots[n:bucket] = slots, -1
        self._lens[:n], self._lens[n:bucket] = lens, 0
        self._ctx[:n], self._ctx[n:bucket] = pos, 0
        self._qsl[: n + 1] = np.arange(n + 1)
        self._qsl[n + 1 : bucket + 1] = n
        bt[n:bucket] = 0
        self._upload(bucket)
        qsl_cpu = list(range(n + 1)) + [n] * (bucket - n)
        meta = self.meta(bucket, max_seq_len=max(lens), host_lists=(qsl_cpu, lens + [0] * (bucket - n),
                                                                    pos + [0] * (bucket - n)))  # fmt: skip
        return StaticDecodeBatch(bucket, n, self.input_ids[:bucket], self.positions[:bucket], meta, logits_rows,
                                 sample_seqs)  # fmt: skip

    def load_padding(self, bucket: int) -> None:
        """Every row a padding row (no cache reads or writes): what a graph is captured over at startup."""
        self._begin_write()
        for arr, fill in ((self._ids, 0), (self._pos, 0), (self._slots, -1), (self._lens, 0), (self._ctx, 0)):
            arr[:bucket] = fill
        self._qsl[: bucket + 1] = 0
        self._bt[:bucket] = 0
        self._upload(bucket)

    def meta(self, bucket: int, max_seq_len: int, host_lists: tuple[list, list, list] | None = None) -> AttentionMetadata:
        """Padded metadata over the first `bucket` rows of the static buffers."""
        qsl, lens, ctx = host_lists if host_lists is not None else (None, None, None)
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            context_lens=self.context_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            max_query_len=1,
            max_seq_len=max_seq_len,
            block_size=self.block_size,
            sliding_window=None,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=lens,
            context_lens_cpu=ctx,
        )


@dataclass
class DecodeGraphStats:
    captured: list[int] = field(default_factory=list)
    replays: int = 0
    capture_seconds: float = 0.0
    eager_steps: Counter = field(default_factory=Counter)  # reason -> count, for steps that could not replay


class DecodeGraphs:
    """CUDA graphs of `forward(input_ids[P], positions[P], meta) -> float32 logits [P, V]`, one per bucket.

    Every graph writes its logits into one shared static buffer (so 35 buckets do not hold 35 outputs) and shares
    one memory pool; graphs run one at a time on the engine thread, which makes the sharing safe.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        buffers: DecodeBuffers,
        buckets: list[int],
        capture_max_seq_len: int,
        vocab_size: int,
    ):
        if buffers.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.forward = forward
        self.buffers = buffers
        self.buckets = buckets
        self.capture_max_seq_len = capture_max_seq_len
        self.logits = torch.empty(buffers.max_batch, vocab_size, dtype=torch.float32, device=buffers.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.stats = DecodeGraphStats()

    def _run(self, bucket: int, meta: AttentionMetadata) -> None:
        logits = self.forward(self.buffers.input_ids[:bucket], self.buffers.positions[:bucket], meta)
        self.logits[:bucket].copy_(logits)

    def capture(self, bucket: int, warmup: int = 2) -> None:
        """Capture the bucket's graph over the buffers' current contents (padding, or the step being served: the
        warm-up runs then store the same keys/values the replay stores, so they change nothing)."""
        t0 = time.perf_counter()
        meta = self.buffers.meta(bucket, max_seq_len=self.capture_max_seq_len)
        side = torch.cuda.Stream(self.buffers.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles every Triton variant of this shape outside the capture
            for _ in range(warmup):
                self._run(bucket, meta)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._run(bucket, meta)
        self._pool = graph.pool()
        self.graphs[bucket] = graph
        self.stats.captured.append(bucket)
        self.stats.capture_seconds += time.perf_counter() - t0

    def capture_all(self) -> None:
        """Capture every bucket over padding rows, largest first (the pool is sized once, the rest reuse it)."""
        for bucket in sorted(self.buckets, reverse=True):
            if bucket not in self.graphs:
                self.buffers.load_padding(bucket)
                self.capture(bucket)
        torch.cuda.synchronize(self.buffers.device)

    def replay(self, batch: StaticDecodeBatch) -> torch.Tensor:
        """Logits [bucket, V] of the loaded step (a view of the shared buffer: read it before the next replay)."""
        graph = self.graphs.get(batch.bucket)
        if graph is None:
            self.capture(batch.bucket)
            graph = self.graphs[batch.bucket]
        graph.replay()
        self.stats.replays += 1
        return self.logits[: batch.bucket]
