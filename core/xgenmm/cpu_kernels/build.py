"""Build (once per machine and torch build) and load the C++ CPU kernels in `csrc/`.

The sources are compiled with `torch.utils.cpp_extension` into a cache directory keyed by a hash of the sources,
the compiler flags, the torch build and the Python version, so every later process just loads the library (no
per-process compile). `python -m xgenmm.cpu_kernels build` builds it ahead of time (CI's setup does); otherwise the
first process that needs it builds it, under cpp_extension's file lock, which takes 1-2 minutes once (measured:
70+ s on a 2-core machine), with a progress line every 15 s (`BuildProgress`). The build needs `ninja`.

Two libraries, each built only where the CPU runs it (`cpu_features`), each with its own sources, flags and cache key:

* `AVX512_BF16` (`torch.ops.xgenmm_cpu`): the bf16 linears, paged attention and fused ops, AVX-512 with the BF16
  extension (VDPBF16PS, VCVTNEPS2BF16): Sapphire Rapids / Cooper Lake Xeons, AMD Zen 4 and later;
* `AVX2_INT8` (`torch.ops.xgenmm_avx2`): the int8 weight-only linear, the float32 linear on packed weights, and
  the AVX2 builds of the paged attention and the fused small ops (float32 and bf16), AVX2 + FMA + F16C: any x86-64
  since Haswell / Zen, so also the AVX2-only machines the project tests on.

Elsewhere (or with no C++ compiler) nothing is built and callers keep their torch paths. Set XGENMM_CPU_KERNELS=0 to
never use either, XGENMM_CACHE to move the cache (default ~/.cache/xgenmm).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cpu_features import cpu_features

logger = logging.getLogger("xgenmm.cpu_kernels")

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("linear_bf16.cpp", "linear_bf16_packed.cpp", "paged_attention.cpp", "fused_ops.cpp")
CFLAGS = ("-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
          "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512")
LDFLAGS = ("-fopenmp",)


def cpu_supports_kernels() -> bool:
    """x86-64 with AVX-512 BF16 instructions (`cpu_features`: as torch reports it, never parsed from /proc)."""
    return cpu_features().runs_bf16_kernels


def cpu_supports_avx2_kernels() -> bool:
    """x86-64 with AVX2 + FMA + F16C (`cpu_features`, as torch reports it)."""
    return cpu_features().runs_avx2_kernels


@dataclass(frozen=True)
class KernelLibrary:
    """One compiled library: its sources (and the headers they include, hashed into the key), flags, and the CPU
    it needs (`supported`, asked at load time; `needs` says it in words)."""

    name: str
    title: str
    sources: tuple[str, ...]
    headers: tuple[str, ...]
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    needs: str
    supported: Callable[[], bool]
    expected_build_time: str


AVX512_BF16 = KernelLibrary(
    name="xgenmm_cpu_kernels", title="the xgenmm CPU kernels", sources=SOURCES,
    headers=("linear_io.h", "paged_attention_plan.h"), cflags=CFLAGS, ldflags=LDFLAGS, needs="AVX-512 BF16 instructions",
    supported=lambda: cpu_supports_kernels(), expected_build_time="1-2 minutes")
AVX2_INT8 = KernelLibrary(
    name="xgenmm_cpu_kernels_avx2", title="the xgenmm AVX2 kernels",
    sources=("int8_linear_avx2.cpp", "linear_f32_avx2.cpp", "paged_attention_avx2.cpp", "fused_ops_avx2.cpp"),
    headers=("avx2_hugepage.h", "paged_attention_plan.h"),
    # no implicit multiply-add contraction: the float32 small ops round each product as torch does
    cflags=("-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-DCPU_CAPABILITY=AVX2",
            "-DCPU_CAPABILITY_AVX2"),
    ldflags=("-fopenmp",),
    needs="AVX2 + FMA instructions", supported=lambda: cpu_supports_avx2_kernels(),
    expected_build_time="under a minute")
LIBRARIES = (AVX512_BF16, AVX2_INT8)

_lock = threading.Lock()
_state: dict[str, dict] = {}


def unavailable_reason(library: KernelLibrary = AVX512_BF16) -> str | None:
    """Why `library` cannot be used here, or None if it can (building it if needed)."""
    load(library)
    return _state[library.name].get("reason")


def cache_dir() -> Path:
    root = os.environ.get("XGENMM_CACHE") or Path.home() / ".cache" / "xgenmm"
    return Path(root) / "cpu_kernels"


def build_key(library: KernelLibrary = AVX512_BF16) -> str:
    h = hashlib.sha256()
    for name in sorted((*library.sources, *library.headers)):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    h.update(repr((library.cflags, library.ldflags, torch.__version__, torch.version.git_version,
                   sys.version_info[:2])).encode())
    return h.hexdigest()[:16]


def load(library: KernelLibrary = AVX512_BF16) -> bool:
    """Load `library` (building it first if this machine has no build yet); True when its ops are usable. Never
    raises: a failure is logged once and remembered (`unavailable_reason()`)."""
    state = _state.get(library.name)
    if state is not None:
        return state["ok"]
    with _lock:
        if library.name in _state:
            return _state[library.name]["ok"]
        reason = _why_not(library)
        if reason is None:
            try:
                _build_and_load(library)
            except Exception as exc:  # noqa: BLE001 - a missing compiler must not break the engine
                reason = f"building {library.title} failed: {type(exc).__name__}: {str(exc)[-2000:]}"
                logger.warning("%s; using the torch CPU paths", reason)
        _state[library.name] = {"ok": reason is None, "reason": reason}
        return reason is None


def _why_not(library: KernelLibrary = AVX512_BF16) -> str | None:
    if os.environ.get("XGENMM_CPU_KERNELS", "1") == "0":
        return "disabled by XGENMM_CPU_KERNELS=0"
    if not library.supported():
        return f"this CPU has no {library.needs}"
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


def _build_and_load(library: KernelLibrary) -> None:
    from torch.utils import cpp_extension

    key = build_key(library)
    name = f"{library.name}_{key}"
    build_dir = cache_dir() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    so = build_dir / f"{name}.so"
    if so.is_file():
        torch.ops.load_library(str(so))
        return
    with BuildProgress(f"building {library.title}", str(build_dir), library.expected_build_time):
        cpp_extension.load(name=name, sources=[str(CSRC / s) for s in library.sources],
                           extra_cflags=list(library.cflags), extra_ldflags=list(library.ldflags),
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
