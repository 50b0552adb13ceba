"""The engine behind an `XGenMM` instance, opened on first use.

"native" is the core's `LLM` / `AsyncLLM` pair: both are thin clients of the one process-wide engine per
(model, device, dtype), so every `XGenMM` (and LangChain `ChatXGenMM`, reader, ...) on the same weights shares the
weights, the KV cache and the continuous batch. Other backends (e.g. "vllm") come from `xgenmm.backends.get_engine`
and must offer the same `chat` / `chat_stream` / `generate` and async `chat` / `generate` methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xgenmm.errors import XGenMMError

__all__ = ["EngineHandle", "open_engine"]


@dataclass(frozen=True)
class EngineHandle:
    """`sync`: `LLM`-shaped (blocking). `aio`: `AsyncLLM`-shaped (async generators on the event loop)."""

    sync: Any
    aio: Any


def open_engine(backend: str, model: str, device: str | None, dtype: str | None,
                engine_options: dict[str, Any]) -> EngineHandle:
    if backend == "native":
        from xgenmm import LLM, AsyncLLM

        return EngineHandle(sync=LLM(model, device=device, dtype=dtype, **engine_options),
                            aio=AsyncLLM(model, device=device, dtype=dtype, **engine_options))
    try:
        from xgenmm.backends import get_engine
    except ImportError as exc:
        raise XGenMMError(f"backend {backend!r} needs xgenmm.backends, which is not available: {exc}") from exc
    engine = get_engine(backend, model=model, device=device, dtype=dtype, **engine_options)
    return EngineHandle(sync=getattr(engine, "sync", engine), aio=getattr(engine, "aio", engine))
