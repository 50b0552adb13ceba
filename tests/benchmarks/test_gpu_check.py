"""benchmarks/gpu_check.py on CPU: the device's own bandwidth (measured, with the datasheet figure only for
reference) sets the decode limit, and the time budget skips sections instead of overrunning."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spec_bandwidth_by_device_name():
    gc = _load()
    assert gc.spec_bandwidth("NVIDIA H200") == 4.8e12
    assert gc.spec_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gc.spec_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gc.spec_bandwidth("some future accelerator") is None


def test_read_bandwidth_is_measured_and_sets_the_single_stream_target(monkeypatch):
    gc = _load()
    bw = gc.measure_read_bandwidth(torch.device("cpu"))
    assert 1e8 < bw < 1e13  # bytes/s, measured on this machine
    engine = {"single_stream": {"fraction_of_measured_limit": 0.75, "fraction_of_spec_limit": 0.5}}
    target = gc.targets_summary(engine, {}, 128)["single_stream_fraction_of_bandwidth_limit"]
    assert target["measured"] == 0.75 and target["met"] is True


def test_sections_past_the_budget_are_skipped(tmp_path):
    gc = _load()
    results = {"_path": str(tmp_path / "r.json")}
    gc._DEADLINE[:] = [time.monotonic() + 100]
    assert gc.section(results, "env", lambda: {"ok": 1}) == {"ok": 1}
    assert gc.section(results, "flex", lambda: {"ok": 2}) is None  # needs 150 s of room
    assert "skipped" in results["flex"] and results["env"] == {"ok": 1}
    gc._DEADLINE[:] = [time.monotonic() - 1]
    assert gc.section(results, "engine", lambda: {"ok": 3}) is None
    assert (tmp_path / "r.json").is_file()
