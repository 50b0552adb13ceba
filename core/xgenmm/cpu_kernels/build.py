"""Build (once per machine and torch build) and load the C++ CPU kernels in `csrc/`.

The sources are compiled with `torch.utils.cpp_extension` into a cache directory keyed by a hash of the sources,
the compiler flags, the torch build and the Python version, so every later process just loads the library (no
per-process compile). `python -m xgenmm.cpu_kernels build` builds it ahead of time (CI's setup does); otherwise the
first process that needs it builds it, under cpp_extension's file lock, which takes 1-2 minutes once (measured:
70+ s on a 2-core machine), with a progress line every 15 s (`BuildProgress`). The build needs `ninja`.

The kernels use AVX-512 with the BF16 extension (VDPBF16PS, VCVTNEPS2BF16): Sapphire Rapids / Cooper Lake Xeons,
AMD Zen 4 and later. Elsewhere (or with no C++ compiler) nothing is built and callers keep their torch paths.
Set XGENMM_CPU_KERNELS=0 to never use them, XGENMM_CACHE to move the cache (default ~/.cache/xgenmm).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from ..cpu_features import cpu_features

logger = logging.getLogger("xgenmm.cpu_kernels")

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("linear_bf16.cpp", "linear_bf16_packed.cpp", "paged_attention.cpp", "fused_ops.cpp")
CFLAGS = ("-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
          "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_state: dict = {}


def cpu_supports_kernels() -> bool:
    """x86-64 with AVX-512 BF16 instructions (`cpu_features`: as torch reports it, never parsed from /proc)."""
    return cpu_features().runs_bf16_kernels


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used here, or None if they can (building them if needed)."""
    load()
    return _state.get("reason")


def cache_dir() -> Path:
    root = os.environ.get("XGENMM_CACHE") or Path.home() / ".cache" / "xgenmm"
    return Path(root) / "cpu_kernels"


def build_key() -> str:
    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*.[ch]*")):  # the sources and the headers they include
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, torch.version.git_version, sys.version_info[:2])).encode())
    return h.hexdigest()[:16]


def load() -> bool:
    """Load the kernels (building them first if this machine has no build yet); True when `torch.ops.xgenmm_cpu` is
    usable. Never raises: a failure is logged once and remembered (`unavailable_reason()`)."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        reason = _why_not()
        if reason is None:
            try:
                _build_and_load()
            except Exception as exc:  # noqa: BLE001 - a missing compiler must not break the engine
                reason = f"building the CPU kernels failed: {type(exc).__name__}: {str(exc)[-2000:]}"
                logger.warning("%s; using the torch CPU paths", reason)
        _state.update(ok=reason is None, reason=reason)
        return _state["ok"]


def _why_not() -> str | None:
    if os.environ.get("XGENMM_CPU_KERNELS", "1") == "0":
        return "disabled by XGENMM_CPU_KERNELS=0"
    if not cpu_supports_kernels():
        return "this CPU has no AVX-512 BF16 instructions"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++) on PATH"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja; the xgenmm package declares it)"
    return None


class BuildProgress:
    """While a slow step runs: say it started (where, and how long it usually takes), a line every `every_s` seconds
    so a user sees it is alive, and how long it took."""

    def __init__(self, what: str, where: str, expected: str, every_s: float = 15.0, say=None) -> None:
        self.what, self.where, self.expected, self.every_s = what, where, expected, every_s
        self.say = say or (lambda message: logger.warning("%s", message))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def __enter__(self) -> "BuildProgress":
        self._start = time.monotonic()
        self.say(f"{self.what} into {self.where} (once per machine; usually {self.expected})")
        self._thread = threading.Thread(target=self._tick, name="xgenmm-build-progress", daemon=True)
        self._thread.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            self.say(f"... still {self.what}: {time.monotonic() - self._start:.0f} s so far")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        outcome = "done" if exc_type is None else "failed"
        self.say(f"{self.what}: {outcome} after {time.monotonic() - self._start:.0f} s")


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    key = build_key()
    name = f"xgenmm_cpu_kernels_{key}"
    build_dir = cache_dir() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}.so"
    if library.is_file():
        torch.ops.load_library(str(library))
        return
    with BuildProgress("building the xgenmm CPU kernels", str(build_dir), "1-2 minutes"):
        cpp_extension.load(name=name, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=list(CFLAGS),
                           extra_ldflags=list(LDFLAGS), build_directory=str(build_dir), is_python_module=False,
                           verbose=False)
