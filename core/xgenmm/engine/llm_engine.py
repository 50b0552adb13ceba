"""`LLMEngine`: requests in, one scheduled step at a time, `RequestOutput`s out.

Single-threaded by design: `engine_loop.EngineLoop` owns one engine and calls it from one thread; every front end
(sync `LLM`, asyncio `AsyncLLM`, adapters, the HTTP server) talks to the loop. Preparing a request (tokenizing,
decoding and tiling images) is thread-safe and done by the caller, off the loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import load_model, parse_dtype
from ..errors import PromptError, XGenMMError
from ..multimodal.image_processing import ImageProcessor, ProcessedImage
from ..multimodal.image_sources import ImageInputPolicy
from ..sampling_params import SamplingParams
from ..special_tokens import END_TOKEN_ID, ENDOFTEXT_TOKEN_ID
from ..tokenizer import load_tokenizer
from .block_manager import BlockManager
from .config import EngineConfig
from .input_processor import InputProcessor, PreparedRequest
from .model_runner import ModelRunner, num_kv_blocks_for_budget
from .output_processor import OutputProcessor, RequestState, SampleState, Sink, deliver
from .sampler import Sampler, SamplingState
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus
from .vision_cache import VisionCache
from .vision_stream import PendingImageEmbeds

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


class LLMEngine:
    """The native engine core: prepared requests in (`add_request`), one scheduled model step at a time (`step`),
    outputs to each request's sink. Implements the `EngineCore` protocol that `EngineLoop` drives."""

    def __init__(self, model: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 **options: Any):
        self.config = EngineConfig.from_options(**options)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(model, device=device, dtype=dtype, linear_kernel=self.config.linear_kernel,
                                quantization=self.config.quantization,
                                quantized_cache_dir=self.config.quantized_cache_dir)
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        self.model_name = str(model)
        ckpt = self.model.checkpoint_dir
        self.tokenizer = load_tokenizer(ckpt)
        self.image_processor = ImageProcessor.from_pretrained(ckpt)
        self.is_base_model = not self.image_processor.anyres
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
        self.vision_cache = VisionCache(cfg.vision_cache_bytes)
        self.vision_patch_group = 64 if gpu else 5  # patches per vision-encoder call
        self.prefetch_images = gpu if cfg.prefetch_images is None else cfg.prefetch_images
        self._prefetching: dict[str, tuple[PendingImageEmbeds, int, int]] = {}  # hash -> (group, index, patches)
        self.process_generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.sampler = Sampler(self.process_generator)
        self.eos_token_ids = (END_TOKEN_ID, ENDOFTEXT_TOKEN_ID)
        self.input_processor = InputProcessor(self.tokenizer, self.image_processor, vocab_size=self.model.vocab_size,
                                              max_model_len=self.max_model_len,
                                              max_images_per_prompt=cfg.max_images_per_prompt,
                                              default_image_policy=cfg.image_policy,
                                              max_concurrent_image_decodes=cfg.max_concurrent_image_decodes)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self._requests: dict[str, RequestState] = {}
        self._grammar_compiler = None
        self._chat_renderer = None
        self._counters = dict(preemptions=0, generated=0, prompt=0, cached=0, finished=0, failed=0)
        logger.info("engine ready: %s on %s (%s), %d KV blocks of %d", self.model_name, device, self.dtype, num_blocks,
                    cfg.block_size)

    # ---- request preparation (thread-safe, runs in the caller's thread) ------------------------------------------
    def prepare(self, prompt: Any, params: SamplingParams | None, request_id: str,
                image_policy: ImageInputPolicy | None = None) -> PreparedRequest:
        """Tokenize, load and tile images, fuse, fit the context (`InputProcessor`), validate the grammar: everything
        that can fail on bad input fails here, for this request."""
        prepared = self.input_processor.process(prompt, params, request_id, image_policy)
        if prepared.params.structured_outputs is not None:
            self.grammar_compiler.compile(prepared.params.structured_outputs)  # validate now: a bad schema fails alone
        return prepared

    @property
    def chat_renderer(self):
        if self._chat_renderer is None:
            from ..chat.template import engine_chat_renderer

            self._chat_renderer = engine_chat_renderer(self.tokenizer, self.config.chat_content_tokens)
        return self._chat_renderer

    @property
    def grammar_compiler(self):
        if self._grammar_compiler is None:
            from ..structured import GrammarCompiler

            self._grammar_compiler = GrammarCompiler(self.tokenizer, vocab_size=self.model.vocab_size)
        return self._grammar_compiler

    # ---- request lifecycle (engine-loop thread only) -------------------------------------------------------------
    def add_request(self, prepared: PreparedRequest, sink: Sink) -> None:
        rid = prepared.request_id
        if rid in self._requests:
            raise PromptError(f"request id {rid!r} is already in flight")
        req = RequestState(prepared, sink)
        params = prepared.params
        for i in range(params.n):
            seq = Sequence(rid, list(prepared.fused.token_ids), image_spans=prepared.fused.image_spans, sample_index=i,
                           max_tokens=params.max_tokens, arrival_time=prepared.arrival_time)
            state = SampleState(seq, self.output_processor.new_detokenizer(prepared, params),
                                self._sampling_state(seq, params, i), [] if params.logprobs is not None else None)
            (req.samples if i == 0 or not self.config.enable_prefix_caching else req.pending).append(state)
        if not self.config.enable_prefix_caching:
            req.samples, req.pending = req.samples + req.pending, []
        for s in req.samples:
            self.scheduler.add(s.seq)  # PromptTooLongError propagates to the caller (nothing queued yet for it)
        self._requests[rid] = req
        self._counters["prompt"] += len(prepared.fused.token_ids)

    def _sampling_state(self, seq: Sequence, params: SamplingParams, index: int) -> SamplingState:
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.grammar_compiler.compile(params.structured_outputs)
        return SamplingState.create(params, seq.prompt_token_ids, [], sample_index=index, device=self.device,
                                    grammar=grammar, eos_token_ids=self.eos_token_ids)

    def abort_request(self, request_id: str) -> None:
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

    def fail_requests(self, exc: BaseException, request_ids=None) -> None:
        """End requests in flight (all, or `request_ids`) with `exc` delivered to their callers; their KV blocks
        are freed. The engine loop uses it when a step fails or the engine stops."""
        for rid in list(self._requests if request_ids is None else request_ids):
            self._fail(rid, exc)

    def has_unfinished_requests(self) -> bool:
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
            if self.prefetch_images:  # the step is queued on the device: encode what comes next beside it
                self._prefetch_waiting_images()
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
        """Vision tokens for every scheduled sequence that has images (encoded once per request, cached by hash;
        `fresh` holds this step's tokens by hash, so a cache eviction in between cannot lose one)."""
        need: list[RequestState] = []
        for seq in seqs:
            req = self._requests[seq.request_id]
            if seq.image_spans and req.image_embeds is None and req not in need:
                need.append(req)
        todo: dict[str, ProcessedImage] = {}
        fresh: dict[str, torch.Tensor] = {}
        for req in need:
            for img in req.prepared.images:
                h = img.content_hash
                if h in fresh or h in todo:
                    continue
                if (cached := self.vision_cache.get(h)) is not None:
                    fresh[h] = cached
                elif h in self._prefetching:  # encoded ahead on the side stream: wait for it on this stream
                    fresh[h] = self._take_prefetched(h)
                    self.vision_cache.put(h, fresh[h])
                else:
                    todo[h] = img
        if todo:
            # Encode in groups of a few patches: one huge batch of every image's patches is slower on a CPU (the
            # perceiver's [patches, 857, 2 * 1536] intermediates fall out of cache) and no faster on a GPU.
            images = list(todo.values())
            encoded, group, patches = [], [], 0
            for img in images:
                group.append(img)
                patches += img.num_patches
                if patches >= self.vision_patch_group:
                    encoded += self.runner.encode_images(group)
                    group, patches = [], 0
            if group:
                encoded += self.runner.encode_images(group)
            for h, tokens in zip(todo, encoded):
                fresh[h] = tokens
                self.vision_cache.put(h, tokens)
        for req in need:
            req.image_embeds = [fresh[img.content_hash] for img in req.prepared.images]
        return {seq.seq_id: self._requests[seq.request_id].image_embeds for seq in seqs if seq.image_spans}

    def _prefetch_waiting_images(self) -> None:
        """Start encoding the uncached images of the requests at the head of the waiting queue on the vision side
        stream (`ModelRunner.encode_images_async`), so on a GPU they encode while this step's prefill and decodes
        run instead of serially in front of the step that admits them. Bounded by `prefetch_image_patches`
        encoding ahead at once. A failure here only logs: the images are encoded again when their request is
        scheduled, and fail that request alone if they really are bad."""
        try:
            waiting = [req for seq in self.scheduler.waiting
                       if seq.image_spans and (req := self._requests.get(seq.request_id)) is not None
                       and req.image_embeds is None]
            wanted = {img.content_hash for req in waiting for img in req.prepared.images}
            # Encodings nobody waits for any more (their request was aborted) go to the vision cache, freeing budget.
            for h in [h for h, (pending, _, _) in self._prefetching.items() if h not in wanted and pending.ready()]:
                self.vision_cache.put(h, self._take_prefetched(h))
            budget = self.config.prefetch_image_patches - sum(p for _, _, p in self._prefetching.values())
            group: dict[str, ProcessedImage] = {}
            for req in waiting:
                for img in req.prepared.images:
                    h = img.content_hash
                    if h in group or h in self._prefetching or h in self.vision_cache:
                        continue
                    if img.num_patches > budget:
                        budget = 0
                        break
                    group[h] = img
                    budget -= img.num_patches
                if budget <= 0:
                    break
            if group:
                pending = self.runner.encode_images_async(list(group.values()))
                for i, (h, img) in enumerate(group.items()):
                    self._prefetching[h] = (pending, i, img.num_patches)
        except Exception:  # noqa: BLE001 - prefetching is an optimisation; the normal path still encodes
            logger.warning("image prefetch failed; images will be encoded when scheduled", exc_info=True)

    def _take_prefetched(self, content_hash: str) -> torch.Tensor:
        pending, index, _ = self._prefetching.pop(content_hash)
        return pending.result()[index]

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
            vision_cache_hit_rate=self.vision_cache.hit_rate,
            num_preemptions=c["preemptions"],
            num_generated_tokens=c["generated"],
            num_prompt_tokens=c["prompt"],
            num_cached_prompt_tokens=c["cached"],
            num_finished_requests=c["finished"],
            num_failed_requests=c["failed"],
        )


__all__ = ["LLMEngine", "EngineConfig", "EngineStats", "PreparedRequest", "XGenMMError", "parse_dtype"]
