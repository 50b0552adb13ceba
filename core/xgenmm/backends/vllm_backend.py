"""The vLLM backend: xGen-MM on vLLM (tensor parallel, vLLM's kernels), behind the same engine-core protocol.

`VllmEngineCore` implements the `EngineCore` protocol the native `NativeEngineCore` implements (add / step / abort /
stats), so it runs on the same `CoreLoop`, and every front end runs on it unchanged through the front door:
`open_engine("vllm", model, ...)`, `LLM(model, backend="vllm")`, `AsyncLLM(model, backend="vllm")`, one process-wide
vLLM engine per (checkpoint, device, dtype, options). Nothing about requests changes:

* prompts, chat rendering (`ChatRenderer`, tools), image loading (`load_image` under the `ImageInputPolicy`), the
  request-time checks (unknown fields, token ids, `<image>` count, context length, max_tokens clamping) and the
  grammar check are the client's (`xgenmm.client`), done once before vLLM sees the request; this core gets the
  token ids (the native tokenizer's, upstream-exact) and the decoded images (`CoreInputSpec.tiles_images=False`);
* sampling options map one to one (`vllm_params`), structured outputs through vLLM's llguidance ("guidance")
  backend so grammars mean the same; what vLLM cannot honour raises `SamplingParamsError` naming it;
* outputs are our `RequestOutput`s, with the native output kinds, stop reasons, abort outputs and metrics.

vLLM's own `LLMEngine` (what `vllm.LLM` drives) runs on the core loop's thread, which owns it, like the native one;
with `VLLM_ENABLE_V1_MULTIPROCESSING=0` the model runs in that thread, otherwise in vLLM's engine-core process
(and its tensor-parallel workers).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine.output_processor import deliver
from ..engine.request import CoreInputSpec, PreparedRequest
from ..errors import ConfigError, PromptError, XGenMMError
from ..model.config import XGenMMConfig
from ..outputs import RequestOutput
from ..placement import Placement, resolve_dtype
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
    """The vLLM core's own options (the client's, e.g. `image_policy`, are `xgenmm.client.ClientSettings`)."""

    max_images_per_prompt: int = 32
    structured_outputs_backend: str = "guidance"
    engine_args: dict[str, Any] = field(default_factory=dict)


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
            raise ConfigError(f"engine option {name!r} is not supported by the vLLM backend: {why}")
    model_config = XGenMMConfig.from_pretrained(model_dir)
    resolved = resolve_dtype(dtype, model_config, torch.device(platform))
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
        raise ConfigError(f"unknown engine option(s) {', '.join(unknown)} for the vLLM backend (native options: "
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
    """vLLM's `LLMEngine` behind the `EngineCore` protocol (see `engine.core_loop`), with the native output kinds
    (`vllm_outputs.RequestTracker`). Built in the caller's thread; vLLM's engine itself is built on the loop thread
    (`start`). `placement` comes from the front door (`xgenmm.placement`)."""

    def __init__(self, model_dir: str, placement: Placement, *, tokenizer=None, **options: Any):
        self.model_name = str(model_dir)
        self.model_dir = str(model_dir)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_dir)
        self._strip_leading_spaces = leading_spaces_stripped_by_decode(self.tokenizer)
        self.config = VllmEngineConfig(
            max_images_per_prompt=int(options.pop("max_images_per_prompt", 32)),
            structured_outputs_backend=str(options.pop("structured_outputs_backend", "guidance")),
        )
        self.config.engine_args = build_engine_args(self.model_dir, placement.device, placement.dtype, options,
                                                    self.config.structured_outputs_backend,
                                                    self.config.max_images_per_prompt)
        self.vllm_engine = None
        self._llm = None
        self.max_model_len = 0
        self._requests: dict[str, tuple[RequestTracker, Any]] = {}
        self._counters = {"finished": 0, "failed": 0, "prompt": 0, "generated": 0}
        init_openmp_off_the_engine_thread()

    # ---- any thread -----------------------------------------------------------------------------------------------
    @property
    def input_spec(self) -> CoreInputSpec:
        """What the client hands this core: decoded (not tiled) images and plain token ids; known once started."""
        return CoreInputSpec(max_model_len=self.max_model_len, vocab_size=VOCAB_SIZE, tiles_images=False,
                             max_images_per_prompt=self.config.max_images_per_prompt)

    def client_grammar_compiler(self):
        """The compiler the client validates grammars with, once per request: with the "guidance" backend vLLM
        runs the same llguidance grammars, so the native compiler's verdict is vLLM's; other backends check their
        own when the request arrives."""
        if self.config.structured_outputs_backend != "guidance":
            return None
        from ..structured import GrammarCompiler

        return GrammarCompiler(self.tokenizer, vocab_size=VOCAB_SIZE)

    def stats(self) -> VllmEngineStats:
        c = self._counters
        return VllmEngineStats(len(self._requests), c["finished"], c["failed"], c["prompt"], c["generated"])

    # ---- loop thread ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        from vllm import LLM as VllmLLMEngine

        self._llm = VllmLLMEngine(**self.config.engine_args)
        self.vllm_engine = self._llm.llm_engine
        self.max_model_len = int(self.vllm_engine.model_config.max_model_len)

    def close(self) -> None:
        engine, self.vllm_engine, self._llm = self.vllm_engine, None, None
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def add(self, prepared: PreparedRequest, sink) -> None:
        rid = prepared.request_id
        if rid in self._requests:
            raise PromptError(f"request id {rid!r} is already in flight")
        vllm_params = to_vllm_sampling_params(prepared.params, self.config.structured_outputs_backend)
        vllm_prompt: dict[str, Any] = {"prompt_token_ids": prepared.prompt_token_ids}
        if prepared.prompt is not None:
            vllm_prompt["prompt"] = prepared.prompt
        if prepared.images:
            vllm_prompt["multi_modal_data"] = {"image": prepared.images}
        try:
            engine_input = self._render(vllm_prompt)
            tracker = RequestTracker(rid, prepared.prompt, prepared.prompt_token_ids, prepared.params,
                                     prepared.fused_length, prepared.arrival_time, self._strip_leading_spaces)
            self.vllm_engine.add_request(rid, engine_input, vllm_params)
        except Exception as exc:  # this request fails alone
            self._counters["failed"] += 1
            raise exc if isinstance(exc, XGenMMError) else PromptError(f"vLLM refused request {rid!r}: {exc}") from exc
        self._requests[rid] = (tracker, sink)
        self._counters["prompt"] += prepared.fused_length

    def abort(self, request_id: str) -> None:
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

    def has_unfinished(self) -> bool:
        return self.vllm_engine is not None and self.vllm_engine.has_unfinished_requests()

    def fail(self, exc: BaseException, request_ids=None) -> None:
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
