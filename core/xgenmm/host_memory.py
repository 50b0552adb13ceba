"""Keep large activation buffers mapped between uses on CPU (glibc's `mallopt`), instead of a fresh mmap per tensor.

Why: glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh `mmap` and unmaps it on
free, so each large activation of an image prefill (a SigLIP MLP output for 5 crops is 63 MB in float32) is page
faulted and zeroed by the kernel again on every layer. Measured on the 2-core AVX2 machine: SigLIP's tanh-GELU on
[3645, 4304] took 46-48 ms, 28-31 ms with the threshold raised (tcmalloc, which vLLM's CPU guide preloads for the
same reason, gave 28 ms). Raised only once the weights are loaded, so the weights themselves stay in their own
mappings (freed ones go back to the OS at once while a checkpoint is converted or quantized).
"""

from __future__ import annotations

import ctypes
import functools

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 256 * 2**20  # larger requests still get their own mapping (returned on free)
TRIM_THRESHOLD_BYTES = 512 * 2**20  # free memory kept at the top of the heap before it is handed back


@functools.cache
def keep_large_allocations() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); False where there is no glibc `mallopt`.

    Process-wide, like preloading tcmalloc: a process that hosts the engine keeps up to ~0.5 GB of freed heap for
    reuse instead of returning it after every request."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                   TRIM_THRESHOLD_BYTES))
