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


def test_decode_step_breakdown_times_each_engine_phase_and_restores_the_engine(tiny_checkpoint):
    from xgenmm import LLM, SamplingParams
    from xgenmm.client import open_engine

    gc = _load()
    handle = open_engine("native", str(tiny_checkpoint), "cpu", "float32", shared=False)
    try:
        llm = LLM.from_handle(handle)
        engine = llm.handle.core
        sampler = engine.sampler
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        res = gc._decode_step_breakdown(llm, engine, engine.runner, torch.device("cpu"), "a lighthouse", params)
        assert res["generated"] == 6 and res["steps"] == 6  # one prefill step + five decode steps
        phases = res["per_step_ms"]
        assert set(phases) == {"step", "schedule", "build_batch", "execute_launch", "sample_incl_device_wait",
                               "emit_outputs"}
        assert phases["step"] >= phases["execute_launch"] > 0
        assert "graph_replay_bucket1_ms" not in res  # CPU: no CUDA graph to replay
        # every wrapper is gone: the engine serves as before
        assert engine.sampler is sampler and "step" not in vars(engine) and "execute" not in vars(engine.runner)
        assert len(llm.generate("again", params)[0].outputs[0].token_ids) == 6
    finally:
        handle.shutdown()
