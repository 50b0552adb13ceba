"""`open_engine`: the one front door. Every front end (`LLM`, `AsyncLLM`, the HTTP server, the CLI, the LangChain and
LlamaIndex adapters) opens or reuses its engine here, and nowhere else.

The key rule: one shared engine per

    (backend, resolved model directory, resolved device, resolved dtype, every option as given)

so weights load once per process for one configuration, and a caller always gets the options it asked for (asking
again with different options opens a second engine instead of silently reusing one that ignores them). The model
path, device and dtype are resolved and validated first (`xgenmm.placement.resolve_placement`,
`resolve_model_dir`), so "cuda" / "auto" / "bf16" / "./ckpt" and their resolved forms share one engine, and a
mistake fails with a typed error before anything loads. `shared=False` opens a private engine (tests, benchmarks:
e.g. a deliberately small KV cache) that the registry never hands to anyone else.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Any

from ..checkpoint import DEFAULT_MODEL_ID, resolve_model_dir
from ..engine.core_loop import CoreLoop
from ..errors import ConfigError
from ..model.config import XGenMMConfig
from ..multimodal.image_processing import ImageProcessor
from ..placement import resolve_placement
from ..tokenizer import load_tokenizer
from .handle import EngineHandle
from .settings import ClientSettings

__all__ = ["BACKENDS", "open_engine", "shutdown_engines", "open_engine_keys"]

logger = logging.getLogger("xgenmm.client")

BACKENDS = ("native", "vllm")

_shared: dict[tuple, EngineHandle] = {}
_private: list[weakref.ref] = []
_lock = threading.Lock()


def open_engine(backend: str = "native", model: str = DEFAULT_MODEL_ID, device: Any = None, dtype: Any = None, *,
                shared: bool = True, tensor_parallel_size: int = 1, **options: Any) -> EngineHandle:
    """The engine for (`backend`, `model`, `device`, `dtype`, `options`), opened on first use and shared (see the
    module docstring for the key rule); `shared=False` opens a private one. `backend`: "native" (xgenmm's engine) or
    "vllm" (needs vLLM: the `vllm` extra, docs/vllm.md; `tensor_parallel_size` > 1 needs it). Options: the engine's
    (`xgenmm.engine.config.EngineConfig` for native; vLLM's in `xgenmm.backends.vllm_backend`) and the client's
    (`ClientSettings`: `image_policy`, `max_concurrent_image_decodes`, `chat_content_tokens`)."""
    name = str(backend).lower()
    if name not in BACKENDS:
        raise ConfigError(f"unknown engine backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if name == "native" and tensor_parallel_size != 1:
        raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} needs backend='vllm' (the native engine runs "
                          "on one device)")
    if name == "vllm":
        _require_vllm()
        if tensor_parallel_size != 1:
            options["tensor_parallel_size"] = tensor_parallel_size
        if device is None:
            device = _vllm_platform()
    model_dir = resolve_model_dir(model).resolve()
    placement = resolve_placement(device, dtype, XGenMMConfig.from_pretrained(model_dir))
    key = (name, str(model_dir), str(placement.device), str(placement.dtype), _options_key(options))
    if not shared:
        handle = _build(name, str(model), model_dir, placement, dict(options), None)
        with _lock:
            _private.append(weakref.ref(handle))
        return handle
    with _lock:  # also serialises first-time loads of concurrent first callers
        handle = _shared.get(key)
        if handle is not None and handle.is_open:
            return handle
        handle = _build(name, str(model), model_dir, placement, dict(options), key)
        _shared[key] = handle
        return handle


def open_engine_keys() -> list[tuple]:
    """The keys of the shared engines open now (for tests and diagnostics)."""
    with _lock:
        return [k for k, h in _shared.items() if h.is_open]


def _build(backend: str, model: str, model_dir, placement, options: dict[str, Any], key) -> EngineHandle:
    settings = ClientSettings.pop_from(options)
    tokenizer = load_tokenizer(model_dir)
    image_processor = ImageProcessor.from_pretrained(model_dir)
    if backend == "native":
        from ..engine.native_core import NativeEngineCore
        from ..structured import GrammarCompiler

        core = NativeEngineCore(str(model_dir), placement, tokenizer=tokenizer, **options)
        loop = CoreLoop(core, name="xgenmm-native-core")
        compiler = GrammarCompiler(tokenizer, vocab_size=core.input_spec.vocab_size)
    else:
        from ..backends.vllm_backend import VllmEngineCore

        core = VllmEngineCore(str(model_dir), placement, tokenizer=tokenizer, **options)
        loop = CoreLoop(core, name="xgenmm-vllm-core")
        compiler = core.client_grammar_compiler()
    core.model_name = model
    return EngineHandle(backend=backend, model=model, model_dir=model_dir, placement=placement, loop=loop,
                        tokenizer=tokenizer, image_processor=image_processor, settings=settings,
                        grammar_compiler=compiler, key=key)


def _options_key(options: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401  (only to fail early with an install hint)
    except ImportError as exc:
        raise ConfigError('backend "vllm" needs vLLM 0.32: pip install ".[vllm]" in the xgenmm folder (docs/vllm.md)') from exc


def _vllm_platform() -> str:
    from vllm.platforms import current_platform

    return current_platform.device_type


def shutdown_engines() -> None:
    """Stop every engine this process opened (shared and private)."""
    with _lock:
        handles = list(_shared.values()) + [h for r in _private if (h := r()) is not None]
        _shared.clear()
        _private.clear()
    for handle in handles:
        handle.shutdown()


# Stop the core threads before the interpreter tears down torch (avoids aborts from a thread mid-step at exit).
atexit.register(shutdown_engines)
