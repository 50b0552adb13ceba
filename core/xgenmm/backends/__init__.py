"""Engine backends behind one interface: `get_engine(backend, model=..., ...)` -> `Engine(sync, aio)`.

* "native": xgenmm's own engine (`xgenmm.LLM` / `xgenmm.AsyncLLM`, one shared engine per model/device/dtype).
* "vllm": the same front ends over vLLM (`backends.vllm_backend`), for tensor parallelism and vLLM's kernels; needs
  vLLM and the xgenmm vLLM plugin (the `vllm` extra, docs/vllm.md). Its extra options: `tensor_parallel_size`,
  `structured_outputs_backend` ("guidance", the default, keeps grammars identical to native), `vllm_options` (any
  `vllm.EngineArgs` fields), or EngineArgs fields by name.

`sync` is `LLM`-shaped (`generate`, `chat`, `stream`, `chat_stream`, `get_tokenizer`), `aio` is `AsyncLLM`-shaped
(async `generate`, `chat`, `abort`, `get_tokenizer`). Both are lazy imports: `import xgenmm.backends` loads neither
engine, and the native path never imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["BACKENDS", "Engine", "get_engine"]

BACKENDS = ("native", "vllm")


@dataclass(frozen=True)
class Engine:
    """One engine reached two ways: blocking (`sync`) and asyncio (`aio`); both share the weights and the batch."""

    backend: str
    sync: Any
    aio: Any

    def get_tokenizer(self):
        return self.sync.get_tokenizer()


def get_engine(backend: str = "native", *, model: str, device: str | None = None, dtype: Any = None,
               tensor_parallel_size: int = 1, **options: Any) -> Engine:
    """The process-wide engine for `model` on `backend` ("native" or "vllm"), created on first use. Every front end
    (LangChain, LlamaIndex, the CLI) resolves its engine here. `tensor_parallel_size` > 1 needs the vLLM backend."""
    name = str(backend).lower()
    if name == "native" and tensor_parallel_size != 1:
        raise ConfigError(f"tensor_parallel_size={tensor_parallel_size} needs backend='vllm' (the native engine runs "
                          "on one device)")
    if name == "vllm" and tensor_parallel_size != 1:
        options["tensor_parallel_size"] = tensor_parallel_size
    if name == "native":
        from ..async_llm import AsyncLLM
        from ..llm import LLM

        return Engine("native", LLM(model, device=device, dtype=dtype, **options),
                      AsyncLLM(model, device=device, dtype=dtype, **options))
    if name == "vllm":
        try:
            import vllm  # noqa: F401  (only to fail early with an install hint)
        except ImportError as exc:
            raise ConfigError('backend "vllm" needs vLLM 0.32: pip install ".[vllm]" in the xgenmm folder (docs/vllm.md)') from exc
        from .vllm_backend import VllmAsyncLLM, VllmLLM, get_vllm_engine_loop

        loop = get_vllm_engine_loop(model, device, dtype, **options)
        return Engine("vllm", VllmLLM.from_engine_loop(loop), VllmAsyncLLM.from_engine_loop(loop))
    raise ConfigError(f"unknown engine backend {backend!r}; choose one of {', '.join(BACKENDS)}")
