"""`NativeEngineCore`: prepared requests in, one scheduled step at a time, `RequestOutput`s out.

Single-threaded by design: `core_loop.CoreLoop` owns one core and calls it from one thread. Requests arrive prepared
by the client (`xgenmm.client`: token ids, images decoded and tiled once, the fused prompt, the grammar compiled
once); this core schedules them, runs the model (vision tokens: `vision_tokens.VisionTokens`), samples and emits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import load_model
from ..errors import PromptError
from ..placement import Placement
from ..sampling_params import SamplingParams
from ..special_tokens import END_TOKEN_ID, ENDOFTEXT_TOKEN_ID
from ..tokenizer import load_tokenizer
from .block_manager import BlockManager
from .config import EngineConfig
from .model_runner import ModelRunner, num_kv_blocks_for_budget
from .output_processor import OutputProcessor, RequestState, SampleState, Sink, deliver
from .request import CoreInputSpec, PreparedRequest
from .sampler import Sampler, SamplingState
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus
from .vision_tokens import VisionTokens

logger = logging.getLogger("xgenmm.engine")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_kv_blocks: int
    prefix_cache_hit_rate: float
    vision_cache_hit_rate: float
    num_preemptions: int
    num_generated_tokens: int
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    num_finished_requests: int
    num_failed_requests: int


class NativeEngineCore:
    """The native engine core: prepared requests in (`add`), one scheduled model step at a time (`step`), outputs to
    each request's sink. Implements the `EngineCore` protocol that `CoreLoop` drives. `placement` is resolved by the
    caller (`xgenmm.placement.resolve_placement`); `tokenizer` is the client's (loaded here when None)."""

    def __init__(self, model_dir: str, placement: Placement, *, tokenizer=None, **options: Any):
        self.config = EngineConfig.from_options(**options)
        device = placement.device
        self.model = load_model(model_dir, device=device, dtype=placement.dtype, linear_kernel=self.config.linear_kernel,
                                quantization=self.config.quantization,
                                quantized_cache_dir=self.config.quantized_cache_dir)
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        self.model_name = str(model_dir)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model.checkpoint_dir)
        text_cfg = self.model.config.text
        cfg = self.config
        self.max_model_len = min(cfg.max_model_len or text_cfg.max_position_embeddings, text_cfg.max_position_embeddings)
        gpu = device.type == "cuda"
        self.max_num_seqs = cfg.max_num_seqs or (256 if gpu else 64)
        self.max_num_batched_tokens = cfg.max_num_batched_tokens or (8192 if gpu else 2048)
        num_blocks = num_kv_blocks_for_budget(self.model, cfg.block_size, self.dtype, device, cfg.kv_cache_memory_bytes,
                                              cfg.gpu_memory_utilization)
        self.runner = ModelRunner(self.model, device, self.dtype, cfg.block_size, num_blocks, cfg.attention_backend,
                                  max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
                                  cuda_graphs=False if cfg.enforce_eager else None)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len)
        self.vision = VisionTokens(self.runner, cache_bytes=cfg.vision_cache_bytes, patch_group=64 if gpu else 5,
                                   prefetch=gpu if cfg.prefetch_images is None else cfg.prefetch_images,
                                   prefetch_patches=cfg.prefetch_image_patches)
        self.process_generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.sampler = Sampler(self.process_generator)
        self.eos_token_ids = (END_TOKEN_ID, ENDOFTEXT_TOKEN_ID)
        self._input_spec = CoreInputSpec(max_model_len=self.max_model_len, vocab_size=self.model.vocab_size,
                                         tiles_images=True, max_images_per_prompt=cfg.max_images_per_prompt)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self._requests: dict[str, RequestState] = {}
        self._counters = dict(preemptions=0, generated=0, prompt=0, cached=0, finished=0, failed=0)
        logger.info("engine ready: %s on %s (%s), %d KV blocks of %d", self.model_name, device, self.dtype, num_blocks,
                    cfg.block_size)

    @property
    def input_spec(self) -> CoreInputSpec:
        """What the client hands this core: tiled images and the fused prompt (any thread)."""
        return self._input_spec

    # ---- request lifecycle (engine-loop thread only) -------------------------------------------------------------
    def add(self, prepared: PreparedRequest, sink: Sink) -> None:
        rid = prepared.request_id
        if rid in self._requests:
            raise PromptError(f"request id {rid!r} is already in flight")
        req = RequestState(prepared, sink)
        params = prepared.params
        for i in range(params.n):
            seq = Sequence(rid, list(prepared.fused.token_ids), image_spans=prepared.fused.image_spans, sample_index=i,
                           max_tokens=params.max_tokens, arrival_time=prepared.arrival_time)
            sampling = self._sampling_state(seq, params, i, prepared.grammar)
            state = SampleState(seq, self.output_processor.new_detokenizer(prepared, params), sampling,
                                [] if params.logprobs is not None else None)
            (req.samples if i == 0 or not self.config.enable_prefix_caching else req.pending).append(state)
        if not self.config.enable_prefix_caching:
            req.samples, req.pending = req.samples + req.pending, []
        for s in req.samples:
            self.scheduler.add(s.seq)  # PromptTooLongError propagates to the caller (nothing queued yet for it)
        self._requests[rid] = req
        self._counters["prompt"] += len(prepared.fused.token_ids)

    def _sampling_state(self, seq: Sequence, params: SamplingParams, index: int, prepared_grammar) -> SamplingState:
        grammar = None
        if params.structured_outputs is not None:  # compiled once by the client; one matcher per sample
            if prepared_grammar is None:
                raise PromptError(f"request {seq.request_id!r} has structured_outputs but no compiled grammar")
            grammar = prepared_grammar.matcher()
        return SamplingState.create(params, seq.prompt_token_ids, [], sample_index=index, device=self.device,
                                    grammar=grammar, eos_token_ids=self.eos_token_ids)

    def abort(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort(request_id)
        for s in req.samples + req.pending:
            if s.finish_reason is None:
                s.finish_reason = "abort"
        req.samples += req.pending
        req.pending = []
        req.metrics.finished_time = time.monotonic()
        self._emit(req, force=True)

    def fail(self, exc: BaseException, request_ids=None) -> None:
        """End requests in flight (all, or `request_ids`) with `exc` delivered to their callers; their KV blocks
        are freed. The engine loop uses it when a step fails or the engine stops."""
        for rid in list(self._requests if request_ids is None else request_ids):
            self._fail(rid, exc)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ---- one step ------------------------------------------------------------------------------------------------
    def step(self) -> None:
        out = self.scheduler.schedule()
        self._counters["preemptions"] += len(out.preempted)
        for seq in out.finished_for_capacity:
            self._finish_sample(seq, "length")
        touched: set[str] = {s.request_id for s in out.finished_for_capacity}
        if out.scheduled:
            now = time.monotonic()
            try:
                embeds = self._image_embeds_for([s.seq for s in out.scheduled])
                batch = self.runner.build_batch([(s.seq, s.num_new_tokens) for s in out.scheduled], embeds)
                logits = self.runner.execute(batch)
            except Exception as exc:  # an internal failure: fail this step's requests, keep serving the rest
                logger.exception("engine step failed")
                for rid in {s.seq.request_id for s in out.scheduled}:
                    self._fail(rid, exc)
                return
            if self.vision.prefetch_enabled:  # the step is queued on the device: encode what comes next beside it
                self.vision.prefetch(self._waiting_with_images())
            for s in out.scheduled:
                req = self._requests.get(s.seq.request_id)
                if req is not None and req.metrics.first_scheduled_time is None:
                    req.metrics.first_scheduled_time = now
                    req.metrics.num_cached_tokens = s.seq.num_cached_tokens
                    self._counters["cached"] += s.seq.num_cached_tokens
            ready = self.scheduler.on_step_done(out)
            ready_ids = {id(s) for s in ready}
            rows = [i for i, seq in enumerate(batch.sample_seqs) if id(seq) in ready_ids]
            if rows:
                seqs = [batch.sample_seqs[i] for i in rows]
                if len(rows) != len(batch.sample_seqs):
                    logits = logits[rows]
                states = [self._sample_state(seq) for seq in seqs]
                result = self.sampler(logits, [st.sampling for st in states])
                for seq, st, token, lp, err in zip(seqs, states, result.token_ids, result.logprobs, result.grammar_errors):
                    self._append(seq, st, token, lp, err)
                    touched.add(seq.request_id)
            touched.update(s.seq.request_id for s in out.scheduled)
        for rid in touched:
            req = self._requests.get(rid)
            if req is not None:
                self._emit(req)

    def _sample_state(self, seq: Sequence) -> SampleState:
        return self._requests[seq.request_id].sample_of(seq)

    def _image_embeds_for(self, seqs: list[Sequence]) -> dict[int, list[torch.Tensor]]:
        """Vision tokens for every scheduled sequence that has images (encoded once per request)."""
        with_images = [seq for seq in seqs if seq.image_spans]
        self.vision.tokens_for({id(r): r for r in (self._requests[seq.request_id] for seq in with_images)}.values())
        return {seq.seq_id: self._requests[seq.request_id].image_embeds for seq in with_images}

    def _waiting_with_images(self) -> list[RequestState]:
        """Requests at the head of the waiting queue whose images are not encoded yet, in queue order."""
        out: list[RequestState] = []
        for seq in self.scheduler.waiting:
            req = self._requests.get(seq.request_id)
            if seq.image_spans and req is not None and req.image_embeds is None and req not in out:
                out.append(req)
        return out

    def _append(self, seq: Sequence, st: SampleState, token: int, logprobs, grammar_error: str | None = None) -> None:
        req = self._requests[seq.request_id]
        seq.append_token(token)
        st.sampling.output_token_ids.append(token)
        self._counters["generated"] += 1
        reason = self.output_processor.on_token(req, st, token, logprobs, grammar_error)
        if reason is not None:
            self._finish_sample(seq, reason)
        if seq.sample_index == 0 and req.pending and seq.num_output_tokens == 1:
            for sib in req.pending:  # the prompt is cached now: siblings share its blocks
                self.scheduler.add(sib.seq)
                req.samples.append(sib)
            req.pending = []

    def _finish_sample(self, seq: Sequence, reason: str) -> None:
        req = self._requests.get(seq.request_id)
        if req is None:
            return
        st = req.sample_of(seq)
        st.finish_reason = reason
        if seq.status is not SequenceStatus.FINISHED:
            self.scheduler.finish(seq, reason)
        if req.pending and seq.sample_index == 0 and seq.num_output_tokens == 0:
            for sib in req.pending:  # sample 0 could not even start: its siblings cannot either
                sib.finish_reason = reason
            req.samples += req.pending
            req.pending = []
        self.sampler.release(st.sampling)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.abort(request_id)
        self._counters["failed"] += 1
        deliver(req.sink, exc)

    def _emit(self, req: RequestState, force: bool = False) -> None:
        result = self.output_processor.make_output(req, force)
        if result is None:
            return
        if result.finished:
            self._requests.pop(req.request_id, None)
            self._counters["finished"] += 1
        deliver(req.sink, result)

    # ---- observability -------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        c = self._counters
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=bm.usage,
            num_kv_blocks=bm.num_total_blocks,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
            vision_cache_hit_rate=self.vision.hit_rate,
            num_preemptions=c["preemptions"],
            num_generated_tokens=c["generated"],
            num_prompt_tokens=c["prompt"],
            num_cached_prompt_tokens=c["cached"],
            num_finished_requests=c["finished"],
            num_failed_requests=c["failed"],
        )


__all__ = ["NativeEngineCore", "EngineConfig", "EngineStats"]
