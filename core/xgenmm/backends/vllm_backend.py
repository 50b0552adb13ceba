"""The vLLM backend: xGen-MM on vLLM (tensor parallel, vLLM's kernels), behind the native engine interface.

`VllmEngineLoop` is a drop-in for the native `EngineLoop` (`prepare` / `submit` / `abort` / `stats` / `engine`), so
the native front ends run on it unchanged: `VllmLLM` is `xgenmm.LLM` (sync `generate` / `chat` / `stream` /
`chat_stream`) and `VllmAsyncLLM` is `xgenmm.AsyncLLM` (async `generate` / `chat`, `abort`, cancellation aborts),
each over a process-wide vLLM engine per (checkpoint, dtype, options). Nothing about requests changes:

* prompts, chat rendering (`ChatRenderer`, tools), image loading (`load_image` under the `ImageInputPolicy`) and the
  request-time checks (unknown fields, token ids, `<image>` count, context length, max_tokens clamping) are the
  native engine's, done here before vLLM sees the request; the token ids vLLM gets are the native tokenizer's;
* sampling options map one to one (`vllm_params`), structured outputs through vLLM's llguidance ("guidance")
  backend so grammars mean the same; what vLLM cannot honour raises `SamplingParamsError` naming it;
* outputs are our `RequestOutput`s, with the native output kinds, stop reasons, abort outputs and metrics.

vLLM's own `LLMEngine` (what `vllm.LLM` drives) runs on one background thread that owns it, like the native loop;
with `VLLM_ENABLE_V1_MULTIPROCESSING=0` the model runs in that thread, otherwise in vLLM's engine-core process
(and its tensor-parallel workers).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..async_llm import AsyncLLM
from ..checkpoint import parse_dtype, resolve_model_dir
from ..config import XGenMMConfig
from ..errors import (
    ConfigError,
    EngineDeadError,
    ImageCountMismatchError,
    PromptError,
    PromptTooLongError,
    RequestAbortedError,
    SamplingParamsError,
    XGenMMError,
)
from ..image_processing import ImageProcessor, ProcessedImage
from ..llm import LLM
from ..multimodal.image_sources import ImageInputPolicy, load_image
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..special_tokens import IMAGE_TOKEN_ID, VOCAB_SIZE
from ..tokenizer import load_tokenizer
from .vllm_outputs import RequestTracker, leading_spaces_stripped_by_decode
from .vllm_params import to_vllm_sampling_params

logger = logging.getLogger("xgenmm.vllm")

Sink = Callable[[RequestOutput | BaseException], None]

# Native engine options and what they become in vLLM's EngineArgs.
MAPPED_OPTIONS = {
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "block_size": "block_size",
    "kv_cache_memory_bytes": "kv_cache_memory_bytes",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "enable_prefix_caching": "enable_prefix_caching",
    "max_model_len": "max_model_len",
    "seed": "seed",
}
# Native engine options vLLM has no counterpart for: refused by name instead of silently ignored.
UNSUPPORTED_OPTIONS = {
    "attention_backend": "vLLM chooses its own attention kernels (see VLLM_ATTENTION_BACKEND)",
    "vision_cache_bytes": "vLLM sizes its multimodal encoder cache itself (see mm_processor_cache_gb)",
}
DEFAULT_CPU_KV_CACHE_BYTES = 1024**3  # the native engine's CPU default


@dataclass
class VllmEngineConfig:
    """What the native front ends read from `engine.config`."""

    image_policy: ImageInputPolicy = field(default_factory=ImageInputPolicy)
    max_images_per_prompt: int = 32
    structured_outputs_backend: str = "guidance"
    engine_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class VllmPreparedRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    vllm_prompt: dict[str, Any]
    vllm_params: Any
    params: SamplingParams
    fused_length: int
    arrival_time: float = field(default_factory=time.monotonic)


def build_engine_args(model_dir: str, device: str | None, dtype: Any, options: dict[str, Any],
                      structured_backend: str, max_images: int) -> dict[str, Any]:
    """Native engine options (+ vLLM EngineArgs by name, + `vllm_options`) -> `vllm.LLM(**kwargs)`."""
    import torch
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    options = dict(options)
    platform = current_platform.device_type
    if device is not None and torch.device(device).type != platform:
        raise ConfigError(f"the vLLM backend runs on vLLM's platform ({platform!r}); device={device!r} was asked")
    for name, why in UNSUPPORTED_OPTIONS.items():
        if options.pop(name, None) is not None:
            raise TypeError(f"engine option {name!r} is not supported by the vLLM backend: {why}")
    resolved = parse_dtype(dtype, XGenMMConfig.from_pretrained(model_dir), torch.device(platform))
    args: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": model_dir,
        "dtype": str(resolved).removeprefix("torch."),
        "trust_remote_code": False,
        "limit_mm_per_prompt": {"image": max_images},
        "structured_outputs_config": {"backend": structured_backend},
    }
    if platform == "cpu":
        args["enforce_eager"] = True  # torch.compile costs ~40 s per start on CPU for little gain at small batch
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            args["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_BYTES
    for native, vllm_name in MAPPED_OPTIONS.items():
        if native in options:
            value = options.pop(native)
            if value is not None:
                args[vllm_name] = value
    args.update(options.pop("vllm_options", None) or {})
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown engine option(s) {', '.join(unknown)} for the vLLM backend (native options: "
                        f"{', '.join(sorted(MAPPED_OPTIONS))}; or any vllm.EngineArgs field)")
    args.update(options)
    return args


def init_openmp_off_the_engine_thread() -> None:
    """Run one small parallel torch op on the calling thread, before vLLM's engine thread exists.

    vLLM's CPU worker pins its OpenMP threads when it starts. When the engine thread was the first thread of the
    process to use OpenMP, vLLM decoded ~10x slower on the CI's 2-core machine (70 instead of 600-1200 tokens/s,
    steady, whatever the load); one parallel op on any other thread first (here: the caller's) avoids it. Costs ~1 ms.
    """
    import torch

    x = torch.ones(256, 256)
    (x @ x).sum().item()


class _EngineFacade:
    """The parts of the native `LLMEngine` the front ends use: tokenizer, chat renderer, config, model name."""

    def __init__(self, loop: "VllmEngineLoop"):
        self._loop = loop

    @property
    def tokenizer(self):
        return self._loop.tokenizer

    @property
    def config(self) -> VllmEngineConfig:
        return self._loop.config

    @property
    def model_name(self) -> str:
        return self._loop.model_name

    @property
    def chat_renderer(self):
        return self._loop.chat_renderer

    @property
    def max_model_len(self) -> int:
        return self._loop.max_model_len

    @property
    def vllm_engine(self):
        """vLLM's `LLMEngine` (touch it only from the loop thread)."""
        return self._loop._engine


@dataclass
class VllmEngineStats:
    num_unfinished_requests: int
    num_finished_requests: int
    num_failed_requests: int
    num_prompt_tokens: int
    num_generated_tokens: int


class VllmEngineLoop:
    """One vLLM engine on one background thread; the same interface as the native `EngineLoop`."""

    def __init__(self, model: str, device: str | None = None, dtype: Any = None, **options: Any):
        self.model_name = str(model)
        self.model_dir = resolve_model_dir(model)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.image_processor = ImageProcessor.from_pretrained(self.model_dir)
        self.is_base_model = not self.image_processor.anyres
        self._strip_leading_spaces = leading_spaces_stripped_by_decode(self.tokenizer)
        self.config = VllmEngineConfig(
            image_policy=options.pop("image_policy", None) or ImageInputPolicy(),
            max_images_per_prompt=int(options.pop("max_images_per_prompt", 32)),
            structured_outputs_backend=str(options.pop("structured_outputs_backend", "guidance")),
        )
        self.config.engine_args = build_engine_args(str(self.model_dir), device, dtype, options,
                                                    self.config.structured_outputs_backend,
                                                    self.config.max_images_per_prompt)
        self.engine = _EngineFacade(self)
        self._chat_renderer = None
        self._ll_tokenizer = None
        self._engine = None
        self._llm = None
        self.max_model_len = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, tuple[RequestTracker, Sink]] = {}
        self._counters = {"finished": 0, "failed": 0, "prompt": 0, "generated": 0}
        self._dead: BaseException | None = None
        self._stopped = False
        self._ready = threading.Event()
        init_openmp_off_the_engine_thread()
        self._thread = threading.Thread(target=self._run, name="xgenmm-vllm-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._dead is not None:
            raise self._dead

    # ---- called from any thread ----------------------------------------------------------------------------------
    @property
    def chat_renderer(self):
        if self._chat_renderer is None:
            from ..prompts import ChatRenderer
            from ..tools import HermesToolRenderer

            self._chat_renderer = ChatRenderer(self.tokenizer, tool_renderer=HermesToolRenderer())
        return self._chat_renderer

    def prepare(self, prompt: Any, params: SamplingParams | None, request_id: str | None = None,
                image_policy: ImageInputPolicy | None = None) -> VllmPreparedRequest:
        """The native `prepare` checks, then the vLLM prompt and sampling params; bad input fails here."""
        from ..engine.engine_loop import new_request_id

        request_id = request_id or new_request_id("vllm")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise SamplingParamsError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        policy = image_policy or self.config.image_policy
        text, token_ids, raw_images = self._parse_prompt(prompt)
        if len(raw_images) > self.config.max_images_per_prompt:
            raise PromptError(f"request {request_id!r} has {len(raw_images)} images; the limit is "
                              f"{self.config.max_images_per_prompt} (engine option max_images_per_prompt)")
        images = [self._load_image(img, policy, i) for i, img in enumerate(raw_images)]
        num_tags = token_ids.count(IMAGE_TOKEN_ID)
        if num_tags != len(images):
            raise ImageCountMismatchError(f"request {request_id!r}: the prompt has {num_tags} <image> tag(s) but "
                                          f"{len(images)} image(s) were given; each <image> takes the next image")
        fused_length = len(token_ids)
        if not self.is_base_model:  # the base prompt already holds 128 ids per image
            fused_length += sum(self.image_processor.expected_num_vision_tokens(self._oriented_size(img)) - 1
                                for img in images)
        if fused_length >= self.max_model_len:
            raise PromptTooLongError(f"request {request_id!r}: the prompt is {fused_length} tokens (with image "
                                     f"tokens); the context is {self.max_model_len}")
        if params.max_tokens is not None and fused_length + params.max_tokens > self.max_model_len:
            params = params.replace(max_tokens=self.max_model_len - fused_length)
        vllm_params = to_vllm_sampling_params(params, self.config.structured_outputs_backend)
        if vllm_params.structured_outputs is not None and self.config.structured_outputs_backend == "guidance":
            self._validate_grammar(vllm_params, params)
        vllm_prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
        if text is not None:
            vllm_prompt["prompt"] = text
        if images:
            vllm_prompt["multi_modal_data"] = {"image": images}
        return VllmPreparedRequest(request_id, text, token_ids, vllm_prompt, vllm_params, params, fused_length)

    def submit(self, prepared: VllmPreparedRequest, sink: Sink) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the vLLM engine loop stopped: {self._dead!r}")
        if self._stopped:
            raise EngineDeadError("the vLLM engine was shut down")
        self._commands.put(("add", prepared, sink))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def stats(self) -> VllmEngineStats:
        c = self._counters
        return VllmEngineStats(len(self._requests), c["finished"], c["failed"], c["prompt"], c["generated"])

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop", None, None))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def check_alive(self) -> None:
        """Raise EngineDeadError if the loop thread is gone (waiters poll this instead of blocking forever)."""
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the vLLM engine loop stopped: {self._dead!r}" if self._dead
                                  else "the vLLM engine was shut down")

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ---- request checks (caller thread) --------------------------------------------------------------------------
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
            bad = [t for t in ids if not 0 <= t < VOCAB_SIZE]
            if bad:
                raise PromptError(f"prompt_token_ids contains ids outside the vocabulary [0, {VOCAB_SIZE}): {bad[:5]}")
            return prompt.get("prompt"), ids, list(images)
        if "prompt" not in prompt:
            raise PromptError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        text = prompt["prompt"]
        return text, self.tokenizer(text, add_special_tokens=False).input_ids, list(images)

    def _load_image(self, image: Any, policy: ImageInputPolicy, index: int):
        if isinstance(image, ProcessedImage):
            raise PromptError(f"image {index}: the vLLM backend tiles images itself and needs the source image "
                              "(PIL, bytes, path, URL, ...), not an already processed ProcessedImage")
        return load_image(image, policy, what=f"image {index}")

    def _oriented_size(self, image) -> tuple[int, int]:
        """(W, H) as the image processor will see it (after the EXIF orientation it applies)."""
        width, height = image.size
        if not self.image_processor.apply_exif_orientation:
            return width, height
        try:
            orientation = image.getexif().get(0x0112, 1)
        except Exception:
            return width, height
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)

    def _validate_grammar(self, vllm_params, params: SamplingParams) -> None:
        """vLLM checks grammars when the request reaches its engine; check here so a bad one fails at the call."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.structured_output.backend_guidance import validate_guidance_grammar

        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, VOCAB_SIZE)
        try:
            validate_guidance_grammar(vllm_params, tokenizer=self._ll_tokenizer)
        except (ValueError, VLLMValidationError) as exc:
            kind = params.structured_outputs.kind
            raise SamplingParamsError(f"invalid structured_outputs.{kind}: {exc}") from None

    # ---- loop thread ---------------------------------------------------------------------------------------------
    def _start_engine(self) -> None:
        from vllm import LLM as VllmLLMEngine

        self._llm = VllmLLMEngine(**self.config.engine_args)
        self._engine = self._llm.llm_engine
        self.max_model_len = int(self._engine.model_config.max_model_len)


    def _render(self, vllm_prompt: dict[str, Any]):
        """The engine input vLLM's own `LLM.generate` would build (runs our multimodal processor)."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        renderer = self._engine.renderer
        parsed = parse_model_prompt(self._engine.model_config, vllm_prompt)
        (engine_input,) = renderer.render_cmpl([parsed], renderer.default_cmpl_tok_params)
        return engine_input

    def _run(self) -> None:
        try:
            self._start_engine()
        except BaseException as exc:
            self._dead = exc
            self._ready.set()
            return
        self._ready.set()
        engine = self._engine
        try:
            while True:
                block = not engine.has_unfinished_requests()
                try:
                    cmd = self._commands.get(block=block)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if not self._handle(cmd):
                        self._fail_all(RequestAbortedError("the vLLM engine was shut down"))
                        self._close_engine()
                        return
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                if engine.has_unfinished_requests():
                    self._deliver(engine.step())
        except BaseException as exc:  # pragma: no cover - defensive: report to every waiter
            logger.exception("vLLM engine loop died")
            self._dead = exc
            self._fail_all(EngineDeadError(f"the vLLM engine loop stopped: {exc!r}"))

    def _handle(self, cmd) -> bool:
        kind, arg, sink = cmd
        if kind == "stop":
            return False
        if kind == "abort":
            entry = self._requests.pop(arg, None)
            if entry is not None:
                self._engine.abort_request([arg])
                out = entry[0].abort()
                if out is not None:
                    entry[1](out)
            return True
        prepared: VllmPreparedRequest = arg
        rid = prepared.request_id
        try:
            if rid in self._requests:
                raise PromptError(f"request id {rid!r} is already in flight")
            engine_input = self._render(prepared.vllm_prompt)
            tracker = RequestTracker(rid, prepared.prompt, prepared.prompt_token_ids, prepared.params,
                                     prepared.fused_length, prepared.arrival_time, self._strip_leading_spaces)
            self._engine.add_request(rid, engine_input, prepared.vllm_params)
        except Exception as exc:  # this request fails alone
            self._counters["failed"] += 1
            sink(exc if isinstance(exc, XGenMMError) else PromptError(f"vLLM refused request {rid!r}: {exc}"))
            return True
        self._requests[rid] = (tracker, sink)
        self._counters["prompt"] += prepared.fused_length
        return True

    def _deliver(self, vllm_outputs) -> None:
        for vout in vllm_outputs:
            entry = self._requests.get(vout.request_id)
            if entry is None:
                continue
            tracker, sink = entry
            before = tracker.metrics.num_generated_tokens
            out = tracker.update(vout)
            self._counters["generated"] += tracker.metrics.num_generated_tokens - before
            if tracker.finished:
                del self._requests[vout.request_id]
                self._counters["finished"] += 1
            if out is not None:
                sink(out)

    def _fail_all(self, exc: BaseException) -> None:
        for rid in list(self._requests):
            _, sink = self._requests.pop(rid)
            sink(exc)
        while True:
            try:
                kind, _arg, sink = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                sink(exc)

    def _close_engine(self) -> None:
        engine, self._engine, self._llm = self._engine, None, None
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception:  # pragma: no cover - best effort at shutdown
                logger.debug("vLLM engine core shutdown failed", exc_info=True)


# ---- process-wide engines --------------------------------------------------------------------------------------

_engines: dict[tuple, VllmEngineLoop] = {}
_engines_lock = threading.Lock()


def _options_key(options: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def get_vllm_engine_loop(model: str, device: str | None = None, dtype: Any = None, **options: Any) -> VllmEngineLoop:
    """The process-wide vLLM engine for (checkpoint, device, dtype, options), created on first use."""
    key = (str(resolve_model_dir(model).resolve()), str(device), str(dtype), _options_key(options))
    with _engines_lock:
        loop = _engines.get(key)
        if loop is not None and loop.is_alive and not loop._stopped:
            return loop
        loop = VllmEngineLoop(model, device=device, dtype=dtype, **options)
        _engines[key] = loop
        return loop


def shutdown_vllm_engines() -> None:
    with _engines_lock:
        loops = list(_engines.values())
        _engines.clear()
    for loop in loops:
        loop.shutdown()


atexit.register(shutdown_vllm_engines)


class VllmLLM(LLM):
    """`xgenmm.LLM` on vLLM: `VllmLLM(model, tensor_parallel_size=2).generate(...)`."""

    def __init__(self, model: str, device: str | None = None, dtype: Any = None, **engine_options: Any):
        self.model = model
        self._loop = get_vllm_engine_loop(model, device, dtype, **engine_options)


class VllmAsyncLLM(AsyncLLM):
    """`xgenmm.AsyncLLM` on vLLM (shares the engine with a `VllmLLM` of the same model and options)."""

    def __init__(self, model: str, device: str | None = None, dtype: Any = None, **engine_options: Any):
        self.model = model
        self._loop = get_vllm_engine_loop(model, device, dtype, **engine_options)
