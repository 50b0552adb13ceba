"""benchmarks/vllm_vs_native.py's accounting: engines rotate through the rounds, every metric is summarised as
median / min / max over the rounds that have it, and each native-vs-vLLM ratio is "> 1 = native better" for both
throughputs and times, beside both engines' absolute medians and the paired per-round range."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("vllm_vs_native_under_test", BENCHMARKS / "vllm_vs_native.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_each_engine_runs_first_in_some_round():
    vn = _load()
    names = ["native", "vllm", "vllm-documented"]
    orders = [vn.round_order(names, r) for r in range(3)]
    assert [o[0] for o in orders] == names
    assert all(sorted(o) == sorted(names) for o in orders)
    assert vn.round_order(names, 3) == names


def test_summary_is_median_min_max_over_the_rounds_that_have_the_metric():
    vn = _load()
    rounds = [{"engine_start_s": 10.0, "decode": {"single": {"decode_tok_per_s": 3.0}}},
              {"engine_start_s": 30.0, "decode": {"single": {"decode_tok_per_s": 5.0}}},
              {"engine_start_s": 20.0}]
    s = vn.summarize(rounds)
    assert s["engine_start_s"] == {"median": 20.0, "min": 10.0, "max": 30.0, "values": [10.0, 30.0, 20.0]}
    assert s["decode.single.decode_tok_per_s"]["median"] == 4.0
    assert "text.output_tok_per_s" not in s


def test_ratios_favour_native_above_one_for_throughputs_and_times():
    vn = _load()
    native = [{"engine_start_s": 10.0, "decode": {"single": {"decode_tok_per_s": 6.0}}},
              {"engine_start_s": 12.0, "decode": {"single": {"decode_tok_per_s": 4.0}}}]
    other = [{"engine_start_s": 40.0, "decode": {"single": {"decode_tok_per_s": 3.0}}},
             {}]  # its second round failed: pairs with nothing
    r = vn.ratios({"native": native, "vllm": other})["native_vs_vllm"]
    start = r["engine_start_s"]
    assert start["ratio_of_medians"] == 4.0 and start["rounds_paired"] == 1
    assert start["native_median"] == 10.0 and start["vllm_median"] == 40.0
    decode = r["decode.single.decode_tok_per_s"]
    assert decode["ratio_of_medians"] == 2.0 and decode["paired_ratio_min"] == decode["paired_ratio_max"] == 2.0


def test_preload_puts_the_documented_libraries_first_once():
    sys.path.insert(0, str(BENCHMARKS))
    from vllm_cpu_setup import with_preload

    env = with_preload({"LD_PRELOAD": "/x/libfoo.so:/lib/libtcmalloc_minimal.so.4"},
                       ["/lib/libtcmalloc_minimal.so.4", "/venv/lib/libiomp5.so"])
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4:/venv/lib/libiomp5.so:/x/libfoo.so"


def test_an_interrupted_run_keeps_its_finished_rounds(tmp_path):
    """After each engine run the report is rewritten: the rounds so far, summarised and paired, marked incomplete;
    the last write marks it complete."""
    import json

    vn = _load()
    out = tmp_path / "r.json"
    runs = {"native": [{"round": 0, "engine_start_s": 10.0}], "vllm": []}
    report = {"engines": {}}
    vn.write_report(report, runs, 3, out, complete=False)
    saved = json.loads(out.read_text())
    assert saved["complete"] is False
    assert saved["engines"]["native"]["summary"]["engine_start_s"]["median"] == 10.0
    assert saved["engines"]["vllm"]["summary"] == {"error": "no round finished"}
    assert saved["ratios"]["native_vs_vllm"] == {}
    runs["vllm"].append({"round": 0, "engine_start_s": 20.0})
    vn.write_report(report, runs, 3, out, complete=True)
    saved = json.loads(out.read_text())
    assert saved["complete"] is True and saved["ratios"]["native_vs_vllm"]["engine_start_s"]["ratio_of_medians"] == 2.0
