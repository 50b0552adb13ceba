"""benchmarks/full_cpu.py's single-stream accounting: this machine's bandwidth flips between two states within
seconds, so a decode window counts only when the probes around it agree, and the fast-state windows are held
against the run's best probe."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCHMARKS))  # full_cpu imports its sibling scripts
    spec = importlib.util.spec_from_file_location("full_cpu_under_test", BENCHMARKS / "full_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_window_is_held_against_the_probes_around_it_only_when_they_agree():
    fc = _load()
    step = 7.5e9  # bytes per decode step
    w = fc.decode_window(0.25, 36e9, 34e9, step)  # 30 GB/s against a steady ~35 GB/s
    assert w["stable"] and w["fraction_of_adjacent_bandwidth"] == round(30e9 / 35e9, 3)
    w = fc.decode_window(0.25, 36e9, 64e9, step)  # the state changed during the window: the larger probe bounds it
    assert not w["stable"] and w["fraction_of_adjacent_bandwidth"] == round(30e9 / 64e9, 3)
    assert w["tok_s"] == 4.0 and w["probes_gb_s"] == [36.0, 64.0]


def test_fast_state_windows_are_held_against_the_best_probe():
    fc = _load()
    step = 7.5e9
    windows = [fc.decode_window(1 / 4.0, 36e9, 35e9, step),  # slow state
               fc.decode_window(1 / 6.0, 63e9, 62e9, step),  # fast state: 45 GB/s
               fc.decode_window(1 / 6.4, 61e9, 64e9, step),  # fast state: 48 GB/s
               fc.decode_window(1 / 5.0, 35e9, 63e9, step)]  # unstable: never counted
    summary = fc.fast_state_summary(windows, 64e9, step)
    assert summary["fast_windows"] == 2
    assert summary["fast_windows_median_tok_s"] == 6.2
    assert summary["fast_windows_fraction_of_best_probe"] == round(6.2 * step / 64e9, 3)
    assert fc.fast_state_summary(windows[:1], 64e9, step) == {
        "fast_windows": 0, "fast_windows_median_tok_s": None, "fast_windows_fraction_of_best_probe": None}


def test_perceiver_flops_charge_only_to_kv_against_the_media_rows(tiny_checkpoint):
    """The perceiver's latents' layers run on 128 rows; only to_kv reads the 729 media tokens too."""
    from torch import nn

    from xgenmm.checkpoint import load_model

    fc = _load()
    perceiver = load_model(tiny_checkpoint, "cpu", "float32").vision.vision_tokenizer
    n, lat = 729, 128
    kv = sum(m.weight.numel() for name, m in perceiver.named_modules() if name.endswith("to_kv"))
    rest = sum(m.weight.numel() for name, m in perceiver.named_modules()
               if isinstance(m, nn.Linear) and not name.endswith("to_kv"))
    assert kv and rest
    assert fc.perceiver_linear_flops(perceiver, n, lat) == 2 * (n + lat) * kv + 2 * lat * rest
    every_param_on_all_rows = 2 * (n + lat) * sum(p.numel() for p in perceiver.parameters())
    assert fc.perceiver_linear_flops(perceiver, n, lat) < every_param_on_all_rows
