"""`EngineClients` (an `LLM` + `AsyncLLM` pair over one engine handle) and `LazyEngine`: the adapters' shared way to
open their engine on first use (one lock, one front door call), so a LangChain / LlamaIndex object can be built,
copied and validated without loading weights. Above both `xgenmm.client` and the clients (`llm`, `async_llm`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from .async_llm import AsyncLLM
from .client import EngineHandle, open_engine
from .llm import LLM

__all__ = ["EngineClients", "LazyEngine"]


@dataclass(frozen=True)
class EngineClients:
    """One engine reached two ways: blocking (`sync`, an `LLM`) and asyncio (`aio`, an `AsyncLLM`); both share the
    weights and the batch of `handle`."""

    handle: EngineHandle
    sync: Any
    aio: Any

    @classmethod
    def of(cls, handle: EngineHandle) -> "EngineClients":
        return cls(handle, LLM.from_handle(handle), AsyncLLM.from_handle(handle))

    @classmethod
    def open(cls, backend: str = "native", **arguments: Any) -> "EngineClients":
        """`open_engine(backend, **arguments)`'s clients (the shared engine unless `shared=False`)."""
        return cls.of(open_engine(backend, **arguments))

    @property
    def backend(self) -> str:
        return self.handle.backend

    def get_tokenizer(self):
        return self.handle.tokenizer


class LazyEngine:
    """Opens `open_engine(**arguments())` the first time `get(arguments)` is called (thread-safe: concurrent first
    callers open it once) and keeps the clients. `arguments` is read then, so an adapter's fields set after
    construction still count; `set(clients)` injects clients (tests, or an engine the caller opened)."""

    def __init__(self) -> None:
        self._clients: EngineClients | None = None
        self._lock = threading.Lock()

    def get(self, arguments: Callable[[], dict[str, Any]]) -> EngineClients:
        if self._clients is None:
            with self._lock:
                if self._clients is None:
                    self._clients = EngineClients.open(**arguments())
        return self._clients

    def set(self, clients: EngineClients | None) -> None:
        with self._lock:
            self._clients = clients

    @property
    def is_open(self) -> bool:
        return self._clients is not None
