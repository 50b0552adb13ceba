"""The background engine loop, and the process-wide registry of shared engines.

One thread owns each engine core and steps it while any request is in flight; callers on any thread (sync `LLM`,
asyncio `AsyncLLM`, adapters, the server) submit prepared requests and receive outputs through a sink callback. So
every in-flight request, whoever sent it, is continuously batched with the others, and nothing but the loop thread
touches the model or the KV cache. One engine per (model, device, dtype) per process: weights load once.

The loop is generic over the `EngineCore` protocol (add / step / abort / fail): the native `LLMEngine` and the vLLM
backend's `VllmEngineCore` both run on it.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import weakref
from typing import Any, Callable, Protocol

import torch

from ..checkpoint import resolve_model_dir
from ..errors import EngineDeadError, RequestAbortedError
from ..outputs import RequestOutput
from .llm_engine import LLMEngine
from .output_processor import deliver

logger = logging.getLogger("xgenmm.engine")

Sink = Callable[[RequestOutput | BaseException], None]
_request_counter = itertools.count()


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_request_counter)}"


class EngineCore(Protocol):
    """What `EngineLoop` drives. `prepare` and `stats` may run on any thread; everything else runs on the loop thread.
    Optional: `start()` (run on the loop thread before it serves; vLLM builds its engine there) and `close()` (run
    on the loop thread when it stops)."""

    def prepare(self, prompt: Any, params: Any, request_id: str, image_policy: Any = None) -> Any: ...

    def add_request(self, prepared: Any, sink: Sink) -> None: ...  # raises for this request alone

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def fail_requests(self, exc: BaseException, request_ids: Any = None) -> None: ...

    def stats(self) -> Any: ...


class EngineLoop:
    """One engine core on one background thread; thread-safe `prepare` / `submit` / `abort` for every front end."""

    def __init__(self, engine: EngineCore, name: str = "xgenmm-engine-loop"):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._dead: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._dead is not None:  # the core could not start (e.g. vLLM refused the model)
            raise self._dead

    # ---- called from any thread ----------------------------------------------------------------------------------
    def prepare(self, prompt: Any, params, request_id: str | None = None, image_policy=None):
        return self.engine.prepare(prompt, params, request_id or new_request_id(), image_policy)

    def submit(self, prepared, sink: Sink) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._dead!r}")
        if self._stopped:
            raise EngineDeadError("the engine was shut down")
        self._commands.put(("add", prepared, sink))
        if self._dead is not None or not self._thread.is_alive():  # died between the check and the put
            self._fail_all(EngineDeadError(f"the engine loop stopped: {self._dead!r}"))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def stats(self):
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop", None, None))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    def check_alive(self) -> None:
        """Raise EngineDeadError if the loop thread is gone (waiters poll this instead of blocking forever)."""
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine loop stopped: {self._dead!r}" if self._dead else "the engine was shut down")

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def is_stopped(self) -> bool:
        return self._stopped

    # ---- loop thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            start = getattr(engine, "start", None)
            if start is not None:
                start()
        except BaseException as exc:
            self._dead = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                block = not engine.has_unfinished_requests()
                try:
                    cmd = self._commands.get(block=block)
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if not self._handle(cmd):
                        self._fail_all(RequestAbortedError("the engine was shut down"))
                        self._close()
                        return
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                if engine.has_unfinished_requests():
                    try:
                        engine.step()
                    except Exception as exc:  # an engine bug: fail the requests in flight, keep serving new ones
                        logger.exception("engine step failed; failing the requests in flight")
                        engine.fail_requests(exc)
        except BaseException as exc:  # pragma: no cover - defensive: report to every waiter
            logger.exception("engine loop died")
            self._dead = exc
            self._fail_all(EngineDeadError(f"the engine loop stopped: {exc!r}"))

    def _handle(self, cmd) -> bool:
        kind, arg, sink = cmd
        if kind == "stop":
            return False
        if kind == "abort":
            self.engine.abort_request(arg)
            return True
        try:
            self.engine.add_request(arg, sink)
        except Exception as exc:  # this request fails alone
            deliver(sink, exc)
        return True

    def _fail_all(self, exc: BaseException) -> None:
        self.engine.fail_requests(exc)
        while True:
            try:
                kind, _arg, sink = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                deliver(sink, exc)

    def _close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # pragma: no cover - best effort at shutdown
                logger.debug("engine close failed", exc_info=True)


_engines: dict[tuple[str, str, str, str | None], EngineLoop] = {}
_engines_lock = threading.Lock()


def get_engine_loop(model: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                    **options: Any) -> EngineLoop:
    """The process-wide engine for (model, device, dtype), created on first use and shared by every caller."""
    from ..checkpoint import parse_dtype
    from ..model.config import XGenMMConfig

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with _engines_lock:  # also serialises first-time imports / config reads of concurrent first callers
        path = resolve_model_dir(model)
        resolved_dtype = parse_dtype(dtype, XGenMMConfig.from_pretrained(path), dev)
        # a quantized model is another model: its engine is never shared with the full-precision one
        key = (str(path.resolve()), str(dev), str(resolved_dtype), options.get("quantization"))
        loop = _engines.get(key)
        if loop is not None and loop.is_alive and not loop.is_stopped:
            if options:
                logger.info("reusing the shared engine for %s; options %s apply only when it is first created", key, options)
            return loop
        engine = LLMEngine(str(path), device=dev, dtype=resolved_dtype, **options)
        engine.model_name = str(model)
        loop = EngineLoop(engine)
        _engines[key] = loop
        return loop


def create_engine_loop(model: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                       **options: Any) -> EngineLoop:
    """A private engine (not shared through the registry): for tests and benchmarks that need specific options."""
    loop = EngineLoop(LLMEngine(str(resolve_model_dir(model)), device=device, dtype=dtype, **options))
    loop.engine.model_name = str(model)
    with _engines_lock:
        _private.append(weakref.ref(loop))
    return loop


_private: list = []


def shutdown_all_engines() -> None:
    with _engines_lock:
        loops = list(_engines.values()) + [r() for r in _private if r() is not None]
        _engines.clear()
        _private.clear()
    for loop in loops:
        loop.shutdown()


# Stop the loop threads before the interpreter tears down torch (avoids aborts from a thread mid-step at exit).
atexit.register(shutdown_all_engines)
