"""`CoreLoop`: one engine core on one background thread, and `EngineCore`, the small protocol every core implements.

One thread owns each engine core and steps it while any request is in flight; callers on any thread (sync `LLM`,
asyncio `AsyncLLM`, adapters, the server) submit prepared requests and receive outputs through a sink callback. So
every in-flight request, whoever sent it, is continuously batched with the others, and nothing but the loop thread
touches the model or the KV cache.

The loop is generic over `EngineCore`: the native `NativeEngineCore` and the vLLM backend's `VllmEngineCore` both run
on it. Opening, sharing and preparing requests for engines is the client's job (`xgenmm.client.open_engine`).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Protocol

from ..errors import EngineDeadError, RequestAbortedError
from ..outputs import RequestOutput
from .output_processor import deliver
from .request import CoreInputSpec, PreparedRequest

__all__ = ["CoreLoop", "EngineCore", "Sink"]

logger = logging.getLogger("xgenmm.engine")

Sink = Callable[[RequestOutput | BaseException], None]


class EngineCore(Protocol):
    """What `CoreLoop` drives: `add`, `step`, `abort`, `stats` (+ `has_unfinished` and `fail`, which the loop needs to
    idle and to end requests when a step or the engine fails). `stats` and `input_spec` may be read on any thread;
    everything else runs on the loop thread. Optional: `start()` (run on the loop thread before it serves; vLLM builds
    its engine there; `input_spec` is read after it) and `close()` (run on the loop thread when it stops)."""

    model_name: str

    @property
    def input_spec(self) -> CoreInputSpec: ...

    def add(self, request: PreparedRequest, sink: Sink) -> None: ...  # raises for this request alone

    def step(self) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> Any: ...

    def has_unfinished(self) -> bool: ...

    def fail(self, exc: BaseException, request_ids: Any = None) -> None: ...


class CoreLoop:
    """One engine core on one background thread; thread-safe `submit` / `abort` / `stats` for every client."""

    def __init__(self, core: EngineCore, name: str = "xgenmm-core-loop"):
        self.core = core
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
    def submit(self, request: PreparedRequest, sink: Sink) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._dead!r}")
        if self._stopped:
            raise EngineDeadError("the engine was shut down")
        self._commands.put(("add", request, sink))
        if self._dead is not None or not self._thread.is_alive():  # died between the check and the put
            self._fail_all(EngineDeadError(f"the engine loop stopped: {self._dead!r}"))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def stats(self):
        return self.core.stats()

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
        core = self.core
        try:
            start = getattr(core, "start", None)
            if start is not None:
                start()
        except BaseException as exc:
            self._dead = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                block = not core.has_unfinished()
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
                if core.has_unfinished():
                    try:
                        core.step()
                    except Exception as exc:  # an engine bug: fail the requests in flight, keep serving new ones
                        logger.exception("engine step failed; failing the requests in flight")
                        core.fail(exc)
        except BaseException as exc:  # pragma: no cover - defensive: report to every waiter
            logger.exception("engine loop died")
            self._dead = exc
            self._fail_all(EngineDeadError(f"the engine loop stopped: {exc!r}"))

    def _handle(self, cmd) -> bool:
        kind, arg, sink = cmd
        if kind == "stop":
            return False
        if kind == "abort":
            self.core.abort(arg)
            return True
        try:
            self.core.add(arg, sink)
        except Exception as exc:  # this request fails alone
            deliver(sink, exc)
        return True

    def _fail_all(self, exc: BaseException) -> None:
        self.core.fail(exc)
        while True:
            try:
                kind, _arg, sink = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                deliver(sink, exc)

    def _close(self) -> None:
        close = getattr(self.core, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # pragma: no cover - best effort at shutdown
                logger.debug("engine close failed", exc_info=True)
