"""The vLLM backend: xGen-MM on vLLM (tensor parallel, vLLM's kernels), behind the native engine interface.

`VllmEngineCore` implements the same `EngineCore` protocol as the native `LLMEngine` (add / step / abort / fail),
so it runs on the same generic `EngineLoop`, and the native front ends run on it unchanged: `VllmLLM` is
`xgenmm.LLM` (sync `generate` / `chat` / `stream` / `chat_stream`) and `VllmAsyncLLM` is `xgenmm.AsyncLLM` (async
`generate` / `chat`, `abort`, cancellation aborts), each over a process-wide vLLM engine per (checkpoint, dtype,
options). Nothing about requests changes:

* prompts, chat rendering (`ChatRenderer`, tools), image loading (`load_image` under the `ImageInputPolicy`) and the
  request-time checks (unknown fields, token ids, `<image>` count, context length, max_tokens clamping) are the
  native engine's `InputProcessor`, run here before vLLM sees the request; the token ids vLLM gets are the native
  tokenizer's (upstream-exact);
* sampling options map one to one (`vllm_params`), structured outputs through vLLM's llguidance ("guidance")
  backend so grammars mean the same; what vLLM cannot honour raises `SamplingParamsError` naming it;
* outputs are our `RequestOutput`s, with the native output kinds, stop reasons, abort outputs and metrics.

vLLM's own `LLMEngine` (what `vllm.LLM` drives) runs on the engine loop's thread, which owns it, like the native one;
with `VLLM_ENABLE_V1_MULTIPROCESSING=0` the model runs in that thread, otherwise in vLLM's engine-core process
(and its tensor-parallel workers).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..async_llm import AsyncLLM
from ..checkpoint import parse_dtype, resolve_model_dir
from ..engine.engine_loop import EngineLoop
from ..engine.input_processor import InputProcessor
from ..engine.output_processor import deliver
from ..errors import ConfigError, PromptError, SamplingParamsError, XGenMMError
from ..llm import LLM
from ..model.config import XGenMMConfig
from ..multimodal.image_processing import ImageProcessor
from ..multimodal.image_sources import ImageInputPolicy
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..special_tokens import VOCAB_SIZE
from ..tokenizer import load_tokenizer
from .vllm_kv_cache import vllm_cpu_kv_cache_bytes
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


@dataclass
class VllmEngineConfig:
    """What the native front ends read from `engine.config`."""

    image_policy: ImageInputPolicy = field(default_factory=ImageInputPolicy)
    max_images_per_prompt: int = 32
    structured_outputs_backend: str = "guidance"
    chat_content_tokens: str = "text"  # as the native engine's option
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
    model_config = XGenMMConfig.from_pretrained(model_dir)
    resolved = parse_dtype(dtype, model_config, torch.device(platform))
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
            # Sized from the model: at least one full-context sequence (vLLM refuses to start with less).
            args["kv_cache_memory_bytes"] = vllm_cpu_kv_cache_bytes(model_config, resolved, options.get("max_model_len"))
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


@dataclass
class VllmEngineStats:
    num_unfinished_requests: int
    num_finished_requests: int
    num_failed_requests: int
    num_prompt_tokens: int
    num_generated_tokens: int


class VllmEngineCore:
    """vLLM's `LLMEngine` behind the `EngineCore` protocol (see `engine_loop.EngineLoop`), with the native input
    checks (`InputProcessor`) and output kinds (`vllm_outputs.RequestTracker`). Built in the caller's thread; vLLM's
    engine itself is built on the loop thread (`start`)."""

    def __init__(self, model: str, device: str | None = None, dtype: Any = None, **options: Any):
        self.model_name = str(model)
        self.model_dir = resolve_model_dir(model)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.image_processor = ImageProcessor.from_pretrained(self.model_dir)
        self._strip_leading_spaces = leading_spaces_stripped_by_decode(self.tokenizer)
        self.config = VllmEngineConfig(
            image_policy=options.pop("image_policy", None) or ImageInputPolicy(),
            max_images_per_prompt=int(options.pop("max_images_per_prompt", 32)),
            structured_outputs_backend=str(options.pop("structured_outputs_backend", "guidance")),
            chat_content_tokens=str(options.pop("chat_content_tokens", "text")),
        )
        self.config.engine_args = build_engine_args(str(self.model_dir), device, dtype, options,
                                                    self.config.structured_outputs_backend,
                                                    self.config.max_images_per_prompt)
        self.input_processor: InputProcessor | None = None  # needs max_model_len, known once vLLM has started
        self._chat_renderer = None
        self._ll_tokenizer = None
        self.vllm_engine = None
        self._llm = None
        self.max_model_len = 0
        self._requests: dict[str, tuple[RequestTracker, Any]] = {}
        self._counters = {"finished": 0, "failed": 0, "prompt": 0, "generated": 0}
        init_openmp_off_the_engine_thread()

    # ---- any thread -----------------------------------------------------------------------------------------------
    @property
    def chat_renderer(self):
        if self._chat_renderer is None:
            from ..chat.template import engine_chat_renderer

            self._chat_renderer = engine_chat_renderer(self.tokenizer, self.config.chat_content_tokens)
        return self._chat_renderer

    def prepare(self, prompt: Any, params: SamplingParams | None, request_id: str,
                image_policy: ImageInputPolicy | None = None) -> VllmPreparedRequest:
        """The native input checks, then the vLLM prompt and sampling params; bad input fails here."""
        inputs = self.input_processor
        params = inputs.check_params(params)
        parsed = inputs.parse(prompt)
        images = inputs.load_images(parsed.images, image_policy, request_id, allow_processed=False)  # headers only
        inputs.check_image_tags(parsed.token_ids, len(images), request_id)
        fused_length = inputs.fused_length(parsed.token_ids, images)
        params = inputs.fit_to_context(params, fused_length, request_id)  # budgets before any pixel is decoded
        inputs.decode_images(images, request_id, tile=False)
        vllm_params = to_vllm_sampling_params(params, self.config.structured_outputs_backend)
        if vllm_params.structured_outputs is not None and self.config.structured_outputs_backend == "guidance":
            self._validate_grammar(vllm_params, params)
        vllm_prompt: dict[str, Any] = {"prompt_token_ids": parsed.token_ids}
        if parsed.text is not None:
            vllm_prompt["prompt"] = parsed.text
        if images:
            vllm_prompt["multi_modal_data"] = {"image": images}
        return VllmPreparedRequest(request_id, parsed.text, parsed.token_ids, vllm_prompt, vllm_params, params,
                                   fused_length)

    def stats(self) -> VllmEngineStats:
        c = self._counters
        return VllmEngineStats(len(self._requests), c["finished"], c["failed"], c["prompt"], c["generated"])

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

    # ---- loop thread ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        from vllm import LLM as VllmLLMEngine

        self._llm = VllmLLMEngine(**self.config.engine_args)
        self.vllm_engine = self._llm.llm_engine
        self.max_model_len = int(self.vllm_engine.model_config.max_model_len)
        self.input_processor = InputProcessor(self.tokenizer, self.image_processor, vocab_size=VOCAB_SIZE,
                                              max_model_len=self.max_model_len,
                                              max_images_per_prompt=self.config.max_images_per_prompt,
                                              default_image_policy=self.config.image_policy)

    def close(self) -> None:
        engine, self.vllm_engine, self._llm = self.vllm_engine, None, None
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def add_request(self, prepared: VllmPreparedRequest, sink) -> None:
        rid = prepared.request_id
        if rid in self._requests:
            raise PromptError(f"request id {rid!r} is already in flight")
        try:
            engine_input = self._render(prepared.vllm_prompt)
            tracker = RequestTracker(rid, prepared.prompt, prepared.prompt_token_ids, prepared.params,
                                     prepared.fused_length, prepared.arrival_time, self._strip_leading_spaces)
            self.vllm_engine.add_request(rid, engine_input, prepared.vllm_params)
        except Exception as exc:  # this request fails alone
            self._counters["failed"] += 1
            raise exc if isinstance(exc, XGenMMError) else PromptError(f"vLLM refused request {rid!r}: {exc}") from exc
        self._requests[rid] = (tracker, sink)
        self._counters["prompt"] += prepared.fused_length

    def abort_request(self, request_id: str) -> None:
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            self.vllm_engine.abort_request([request_id])
            out = entry[0].abort()
            if out is not None:
                deliver(entry[1], out)

    def step(self) -> None:
        for vout in self.vllm_engine.step():
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
                deliver(sink, out)

    def has_unfinished_requests(self) -> bool:
        return self.vllm_engine is not None and self.vllm_engine.has_unfinished_requests()

    def fail_requests(self, exc: BaseException, request_ids=None) -> None:
        for rid in list(self._requests if request_ids is None else request_ids):
            entry = self._requests.pop(rid, None)
            if entry is None:
                continue
            if self.vllm_engine is not None:
                self.vllm_engine.abort_request([rid])
            self._counters["failed"] += 1
            deliver(entry[1], exc)

    def _render(self, vllm_prompt: dict[str, Any]):
        """The engine input vLLM's own `LLM.generate` would build (runs our multimodal processor)."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        renderer = self.vllm_engine.renderer
        parsed = parse_model_prompt(self.vllm_engine.model_config, vllm_prompt)
        (engine_input,) = renderer.render_cmpl([parsed], renderer.default_cmpl_tok_params)
        return engine_input


# ---- process-wide engines --------------------------------------------------------------------------------------

_engines: dict[tuple, EngineLoop] = {}
_engines_lock = threading.Lock()


def _options_key(options: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def get_vllm_engine_loop(model: str, device: str | None = None, dtype: Any = None, **options: Any) -> EngineLoop:
    """The process-wide vLLM engine for (checkpoint, device, dtype, options), created on first use."""
    key = (str(resolve_model_dir(model).resolve()), str(device), str(dtype), _options_key(options))
    with _engines_lock:
        loop = _engines.get(key)
        if loop is not None and loop.is_alive and not loop.is_stopped:
            return loop
        loop = EngineLoop(VllmEngineCore(model, device=device, dtype=dtype, **options), name="xgenmm-vllm-engine")
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

    _open_engine_loop = staticmethod(get_vllm_engine_loop)


class VllmAsyncLLM(AsyncLLM):
    """`xgenmm.AsyncLLM` on vLLM (shares the engine with a `VllmLLM` of the same model and options)."""

    _open_engine_loop = staticmethod(get_vllm_engine_loop)
