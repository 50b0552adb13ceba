"""`LLMEngine`: requests in, one scheduled step at a time, `RequestOutput`s out.

Single-threaded by design: `engine_loop.EngineLoop` owns one engine and calls it from one thread; every front end
(sync `LLM`, asyncio `AsyncLLM`, adapters, the HTTP server) talks to the loop. Preparing a request (tokenizing,
decoding and tiling images) is thread-safe and done by the caller, off the loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..checkpoint import load_model, parse_dtype
from ..errors import PromptError, PromptTooLongError, SamplingParamsError, XGenMMError
from ..image_processing import ImageProcessor, ProcessedImage
from ..multimodal.fusion import FusedPrompt, fuse_prompt
from ..multimodal.image_sources import ImageInputPolicy, load_image
from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import RequestOutputKind, SamplingParams
from ..special_tokens import END_TOKEN_ID, ENDOFTEXT_TOKEN_ID
from ..tokenizer import load_tokenizer
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner, num_kv_blocks_for_budget
from .vision_stream import PendingImageEmbeds
from .sampler import Sampler, SamplingState
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus
from .vision_cache import VisionCache

logger = logging.getLogger("xgenmm.engine")


@dataclass
class EngineConfig:
    """Engine options (all have defaults sized for the device)."""

    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # CPU: bytes for the KV cache (default 512 MiB)
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the GPU the engine may fill
    enable_prefix_caching: bool = True
    vision_cache_bytes: int = 512 * 1024**2
    attention_backend: str | None = None  # "torch" | "flex" | "triton" | None (auto)
    max_model_len: int | None = None  # default: the model's max_position_embeddings (4096)
    image_policy: ImageInputPolicy = field(default_factory=ImageInputPolicy)
    seed: int = 0  # process generator for unseeded sampling
    max_images_per_prompt: int = 32
    linear_kernel: str = "auto"  # "auto": oneDNN linears for float32 on CPU (model/cpu_linear.py); "torch": ATen
    enforce_eager: bool = False  # CUDA: never capture / replay decode CUDA graphs (debugging, profiling)
    prefetch_images: bool | None = None  # encode waiting requests' images ahead on a side stream (None: on CUDA)
    prefetch_image_patches: int = 64  # at most this many image patches encoding ahead at once

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)


@dataclass
class PreparedRequest:
    """A request after tokenization and image processing, ready for the engine loop."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    images: list[ProcessedImage]
    fused: FusedPrompt
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class _SampleState:
    seq: Sequence
    detok: IncrementalDetokenizer
    sampling: SamplingState
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_tokens: int = 0
    sent_text: int = 0


class _Request:
    def __init__(self, prepared: PreparedRequest, sink: Callable[[RequestOutput | BaseException], None]):
        self.prepared = prepared
        self.sink = sink
        self.samples: list[_SampleState] = []
        self.pending: list[_SampleState] = []  # n > 1: siblings admitted once sample 0's prompt is cached
        self.image_embeds: list[torch.Tensor] | None = None
        self.metrics = RequestMetrics(arrival_time=prepared.arrival_time, num_prompt_tokens=len(prepared.fused.token_ids))

    @property
    def finished(self) -> bool:
        return not self.pending and all(s.finish_reason is not None for s in self.samples)


def _deliver(sink: Callable[[RequestOutput | BaseException], None], item: RequestOutput | BaseException) -> None:
    """Hand an output to its caller. A caller that went away (closed event loop, ...) must not break the engine."""
    try:
        sink(item)
    except Exception:  # noqa: BLE001 - the consumer is gone; every other request goes on
        logger.debug("dropping an output for a consumer that went away", exc_info=True)


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
    def __init__(self, model: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 **options: Any):
        self.config = EngineConfig.from_options(**options)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(model, device=device, dtype=dtype, linear_kernel=self.config.linear_kernel)
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
        self._requests: dict[str, _Request] = {}
        self._grammar_compiler = None
        self._chat_renderer = None
        self._counters = dict(preemptions=0, generated=0, prompt=0, cached=0, finished=0, failed=0)
        logger.info("engine ready: %s on %s (%s), %d KV blocks of %d", self.model_name, device, self.dtype, num_blocks,
                    cfg.block_size)

    # ---- request preparation (thread-safe, runs in the caller's thread) ------------------------------------------
    def prepare(self, prompt: Any, params: SamplingParams | None, request_id: str,
                image_policy: ImageInputPolicy | None = None) -> PreparedRequest:
        """Tokenize, load and tile images, fuse: everything that can fail on bad input fails here, for this request."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise SamplingParamsError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        policy = image_policy or self.config.image_policy
        text, token_ids, raw_images = self._parse_prompt(prompt)
        if len(raw_images) > self.config.max_images_per_prompt:
            raise PromptError(f"request {request_id!r} has {len(raw_images)} images; the limit is "
                              f"{self.config.max_images_per_prompt} (engine option max_images_per_prompt)")
        images = [self._process_image(img, policy, i) for i, img in enumerate(raw_images)]
        fused = fuse_prompt(token_ids, images, base_model=self.is_base_model)
        if params.max_tokens is None:  # vLLM: None = as many tokens as the context allows
            params = params.replace(max_tokens=max(1, self.max_model_len - len(fused.token_ids)))
        total = len(fused.token_ids) + params.max_tokens
        if len(fused.token_ids) >= self.max_model_len:
            raise PromptTooLongError(f"request {request_id!r}: the prompt is {len(fused.token_ids)} tokens (with image "
                                     f"tokens); the context is {self.max_model_len}")
        if total > self.max_model_len:
            params = params.replace(max_tokens=self.max_model_len - len(fused.token_ids))
        if params.structured_outputs is not None:
            self.grammar_compiler.compile(params.structured_outputs)  # validate now: a bad schema fails alone
        return PreparedRequest(request_id, text, token_ids, images, fused, params)

    @property
    def chat_renderer(self):
        if self._chat_renderer is None:
            from ..prompts import ChatRenderer
            from ..tools import HermesToolRenderer

            self._chat_renderer = ChatRenderer(self.tokenizer, tool_renderer=HermesToolRenderer())
        return self._chat_renderer

    @property
    def grammar_compiler(self):
        if self._grammar_compiler is None:
            from ..structured import GrammarCompiler

            self._grammar_compiler = GrammarCompiler(self.tokenizer, vocab_size=self.model.vocab_size)
        return self._grammar_compiler

    def _parse_prompt(self, prompt: Any) -> tuple[str | None, list[int], list[Any]]:
        if isinstance(prompt, str):
            prompt = {"prompt": prompt}
        if not isinstance(prompt, dict):
            raise PromptError(f"a prompt must be a str or a dict with 'prompt' or 'prompt_token_ids', got {type(prompt).__name__}")
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
        if unknown:
            raise PromptError(f"unknown prompt field(s) {sorted(unknown)}")
        mm = prompt.get("multi_modal_data") or {}
        if set(mm) - {"image"}:
            raise PromptError(f"unsupported modality {sorted(set(mm) - {'image'})}: xGen-MM takes images only")
        images = mm.get("image", [])
        if not isinstance(images, (list, tuple)):
            images = [images]
        if "prompt_token_ids" in prompt:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
            vocab = self.model.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise PromptError(f"prompt_token_ids contains ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            return prompt.get("prompt"), ids, list(images)
        if "prompt" not in prompt:
            raise PromptError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        text = prompt["prompt"]
        return text, self.tokenizer(text, add_special_tokens=False).input_ids, list(images)

    def _process_image(self, image: Any, policy: ImageInputPolicy, index: int) -> ProcessedImage:
        if isinstance(image, ProcessedImage):
            return image
        pil = load_image(image, policy, what=f"image {index}")
        return self.image_processor.process_base(pil) if self.is_base_model else self.image_processor(pil)

    # ---- request lifecycle (engine-loop thread only) -------------------------------------------------------------
    def add_request(self, prepared: PreparedRequest, sink: Callable[[RequestOutput | BaseException], None]) -> None:
        rid = prepared.request_id
        if rid in self._requests:
            raise PromptError(f"request id {rid!r} is already in flight")
        req = _Request(prepared, sink)
        params = prepared.params
        for i in range(params.n):
            seq = Sequence(rid, list(prepared.fused.token_ids), image_spans=prepared.fused.image_spans, sample_index=i,
                           max_tokens=params.max_tokens, arrival_time=prepared.arrival_time)
            state = _SampleState(seq, self._detokenizer(prepared, params), self._sampling_state(seq, params, i),
                                 [] if params.logprobs is not None else None)
            (req.samples if i == 0 or not self.config.enable_prefix_caching else req.pending).append(state)
        if not self.config.enable_prefix_caching:
            req.samples, req.pending = req.samples + req.pending, []
        for s in req.samples:
            self.scheduler.add(s.seq)  # PromptTooLongError propagates to the caller (nothing queued yet for it)
        self._requests[rid] = req
        self._counters["prompt"] += len(prepared.fused.token_ids)

    def _detokenizer(self, prepared: PreparedRequest, params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, prepared.prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                                      stop=params.stop or (), include_stop_str_in_output=params.include_stop_str_in_output)

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

    def _sample_state(self, seq: Sequence) -> _SampleState:
        req = self._requests[seq.request_id]
        return next(s for s in req.samples if s.seq is seq)

    def _image_embeds_for(self, seqs: list[Sequence]) -> dict[int, list[torch.Tensor]]:
        """Vision tokens for every scheduled sequence that has images (encoded once per request, cached by hash;
        `fresh` holds this step's tokens by hash, so a cache eviction in between cannot lose one)."""
        need: list[_Request] = []
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

    def _append(self, seq: Sequence, st: _SampleState, token: int, logprobs, grammar_error: str | None = None) -> None:
        req = self._requests[seq.request_id]
        params = req.prepared.params
        seq.append_token(token)
        st.sampling.output_token_ids.append(token)
        self._counters["generated"] += 1
        req.metrics.num_generated_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.monotonic()
        if logprobs is not None:
            st.cumulative_logprob += logprobs[0][1]
            if st.logprobs is not None:
                st.logprobs.append({tid: Logprob(lp, rank, self.tokenizer.decode([tid])) for tid, lp, rank in logprobs})
        # a stop token's own text is left out (vLLM) and the detokenizer flushes what it held back
        stop_token = token in (params.stop_token_ids or ()) or (token in self.eos_token_ids and not params.ignore_eos)
        st.detok.update([token], stop_terminated=stop_token)
        reason = stop = None
        if token in (params.stop_token_ids or ()):
            reason, stop = "stop", token
        elif token in self.eos_token_ids and not params.ignore_eos:
            reason = "stop"
        elif st.detok.finished:
            reason, stop = "stop", st.detok.stop_reason
        elif st.sampling.grammar is not None and (st.sampling.grammar.is_terminated() or grammar_error):
            if grammar_error:
                logger.warning("request %s: %s", seq.request_id, grammar_error)
            reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            st.detok.flush()  # length / grammar end: release held-back text (no-op after a stop string)
            st.stop_reason = stop
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
        st = next(s for s in req.samples if s.seq is seq)
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
        _deliver(req.sink, exc)

    def _emit(self, req: _Request, force: bool = False) -> None:
        kind = req.prepared.params.output_kind
        finished = req.finished
        if finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.monotonic()
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return
        outputs = []
        changed = force or finished
        for st in sorted(req.samples, key=lambda s: s.seq.sample_index):
            tokens = st.seq.output_token_ids
            text = st.detok.text
            if kind is RequestOutputKind.DELTA:
                new_tokens, new_text = tokens[st.sent_tokens :], text[st.sent_text :]
                lps = st.logprobs[st.sent_tokens :] if st.logprobs is not None else None
                if new_tokens or new_text or st.finish_reason is not None:
                    changed = True
                outputs.append(CompletionOutput(st.seq.sample_index, new_text, list(new_tokens), st.cumulative_logprob
                                                if st.logprobs is not None else None, lps, st.finish_reason, st.stop_reason))
            else:
                changed = True
                outputs.append(CompletionOutput(st.seq.sample_index, text, list(tokens), st.cumulative_logprob
                                                if st.logprobs is not None else None,
                                                list(st.logprobs) if st.logprobs is not None else None,
                                                st.finish_reason, st.stop_reason))
            st.sent_tokens, st.sent_text = len(tokens), len(text)
        if not changed:
            return
        p = req.prepared
        result = RequestOutput(p.request_id, p.prompt, p.prompt_token_ids, outputs, finished, req.metrics,
                               req.metrics.num_cached_tokens)
        if finished:
            self._requests.pop(p.request_id, None)
            self._counters["finished"] += 1
        _deliver(req.sink, result)

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
