"""xgenmm.host_memory: once the engine is loaded, a large activation freed and allocated again reuses its pages
instead of being page-faulted and zeroed by the kernel again (glibc's default for anything above 32 MiB)."""

from __future__ import annotations

import resource

import pytest
import torch

from xgenmm.host_memory import MMAP_THRESHOLD_BYTES, keep_large_allocations


def _minor_faults_filling(nbytes: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(nbytes // 4, dtype=torch.float32)
    t.fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del t
    return faults


def test_large_activation_pages_are_reused_after_free():
    if not keep_large_allocations():
        pytest.skip("no glibc mallopt in this process (not glibc)")
    nbytes = 48 * 2**20  # above glibc's default mmap threshold, below ours
    assert nbytes < MMAP_THRESHOLD_BYTES
    _minor_faults_filling(nbytes)  # first use maps the pages
    pages = nbytes // resource.getpagesize()
    again = min(_minor_faults_filling(nbytes) for _ in range(3))
    assert again < pages // 10, f"{again} page faults refilling a freed {nbytes >> 20} MiB buffer ({pages} pages)"
