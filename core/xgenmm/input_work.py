"""Where a request's input work runs (rendering, tokenizing, decoding images), off the event loop, and what its
failures mean.

Two bounded thread pools instead of asyncio's default one: requests that carry images prepare on the image pool
(`IMAGE_WORKERS` threads, no more than the engine decodes at once, so no thread sits waiting for a decode slot) and
every other request on the text pool. A burst of large images then queues behind itself only: a text request never
waits for a thread held by an image decode. Image workers also run at a lower CPU priority (Linux: `nice` is per
thread), so on a small machine the engine thread keeps its core while images decode.

The boundary rule: anything raised while preparing one request's input is that request's fault, so an exception
that is not already a typed xgenmm error becomes a `PromptError` (a 4xx at the server), logged with its traceback
so a real bug stays visible. Engine faults (`EngineDeadError`, ...) are typed and pass through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import PromptError, XGenMMError

__all__ = ["IMAGE_WORKERS", "TEXT_WORKERS", "input_boundary", "messages_have_images", "prompt_has_images",
           "run_input_work"]

logger = logging.getLogger("xgenmm.input")

# Image decodes run on at most half the cores (at least one; at most the engine's 2 decode slots), so the engine
# thread and text requests keep a core however many images arrive.
IMAGE_WORKERS = max(1, min(2, (os.cpu_count() or 2) // 2))
TEXT_WORKERS = max(4, min(16, (os.cpu_count() or 1) + 2))
_IMAGE_PART_TYPES = ("image_url", "image", "input_image")

T = TypeVar("T")
_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


IMAGE_NICENESS = 10  # image workers yield the CPU to the engine thread and text requests (Linux: per thread)


def _lower_priority() -> None:
    """Runs in each image worker: decoding large images must not take the cores the engine steps need."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), IMAGE_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: the pool bound alone still holds
        pass


def _pool(kind: str) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(kind)
        if pool is None:
            if kind == "image":
                pool = ThreadPoolExecutor(max_workers=IMAGE_WORKERS, thread_name_prefix="xgenmm-image-input",
                                          initializer=_lower_priority)
            else:
                pool = ThreadPoolExecutor(max_workers=TEXT_WORKERS, thread_name_prefix="xgenmm-text-input")
            _pools[kind] = pool
        return pool


def messages_have_images(messages: Any) -> bool:
    """Whether a chat conversation carries image parts (then its input work goes to the image pool)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
            if any(isinstance(part, Mapping) and part.get("type") in _IMAGE_PART_TYPES for part in content):
                return True
    return False


def prompt_has_images(prompt: Any) -> bool:
    """Whether a vLLM-shaped prompt carries `multi_modal_data` images."""
    mm = prompt.get("multi_modal_data") if isinstance(prompt, Mapping) else None
    return isinstance(mm, Mapping) and bool(mm.get("image"))


@contextlib.contextmanager
def input_boundary(passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """The boundary rule for one request's input work, wherever it runs (every front end's `prepare`): an exception
    that is neither a typed xgenmm error nor one of `passthrough` becomes a `PromptError` naming what went wrong,
    logged with its traceback so a real bug stays visible."""
    try:
        yield
    except (XGenMMError, *passthrough):
        raise
    except Exception as exc:
        logger.warning("a request's input could not be processed", exc_info=True)
        raise PromptError(f"the request's input could not be processed ({type(exc).__name__}: "
                          f"{str(exc)[:200]})") from exc


async def run_input_work(fn: Callable[..., T], *args: Any, images: bool,
                         passthrough: tuple[type[BaseException], ...] = (), **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the image or text pool, under `input_boundary(passthrough)`."""
    loop = asyncio.get_running_loop()
    call = functools.partial(fn, *args, **kwargs)
    with input_boundary(passthrough):
        return await loop.run_in_executor(_pool("image" if images else "text"), call)
