"""The first kernel build tells the user what is happening (start, a line while it runs, the time it took), and a
missing ninja is a stated reason instead of a silent fall back. Runs on any CPU: the reporter is exercised around a
real slow step (a sleep standing in for the compiler's wall time, not for the kernels)."""

from __future__ import annotations

import re
import time

import pytest

from xgenmm.cpu_kernels import build


def test_progress_lines_while_a_slow_step_runs():
    lines: list[str] = []
    with build.BuildProgress("building the xgenmm CPU kernels", "/cache/x", "1-2 minutes", every_s=0.05,
                             say=lines.append):
        time.sleep(0.3)
    assert lines[0] == "building the xgenmm CPU kernels into /cache/x (once per machine; usually 1-2 minutes)"
    ticks = [l for l in lines if l.startswith("... still building the xgenmm CPU kernels: ")]
    assert len(ticks) >= 2
    assert re.fullmatch(r"building the xgenmm CPU kernels: done after \d+ s", lines[-1])


def test_a_failed_step_says_so():
    lines: list[str] = []
    with pytest.raises(RuntimeError):
        with build.BuildProgress("building", "/x", "a while", every_s=10, say=lines.append):
            raise RuntimeError("compiler crashed")
    assert lines[-1].startswith("building: failed after ")


def test_missing_ninja_is_a_stated_reason(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(build, "cpu_supports_kernels", lambda: True)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    reason = build._why_not()
    if reason is not None and "compiler" in reason:
        pytest.skip(f"no C++ compiler here: {reason}")
    assert reason is not None and "ninja" in reason
