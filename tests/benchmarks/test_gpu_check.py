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
    target = gc.targets_summary(engine, {})["single_stream_fraction_of_bandwidth_limit"]
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


def test_left_pad_puts_padding_on_the_left_and_masks_it():
    gc = _load()
    rows = [torch.ones(3, 4), 2 * torch.ones(5, 4)]
    embeds, mask = gc.left_pad(rows)
    assert embeds.shape == (2, 5, 4) and mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert embeds[0, :2].abs().sum() == 0 and torch.equal(embeds[0, 2:], rows[0]) and torch.equal(embeds[1], rows[1])


def test_batched_baseline_halves_the_batch_on_out_of_memory_and_records_it():
    gc = _load()
    ran = []

    def run(batch_size):
        ran.append(batch_size)
        if batch_size > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated allocation limit)")
        return {"batch_size": batch_size}

    measured, attempts = gc.run_with_step_down(run, 64)
    assert measured == {"batch_size": 16} and ran == [64, 32, 16]
    assert [a["batch_size"] for a in attempts] == [64, 32] and all("OutOfMemoryError" in a["error"] for a in attempts)

    def never_fits(batch_size):
        raise torch.OutOfMemoryError("CUDA out of memory")

    try:
        gc.run_with_step_down(never_fits, 4)
    except RuntimeError as exc:
        assert "batch 1" in str(exc)
    else:
        raise AssertionError("a run that never fits must fail, not report a figure")


def test_prompt_length_mismatch_is_flagged_and_the_throughput_target_uses_the_measured_batches():
    gc = _load()
    eng = {"ttft_5crop_image": {"prompt_tokens": 649},
           "concurrency": [{"concurrency": 64, "output_tok_s": 2000.0, "prompt_tokens_each": 649}]}
    hf = {"prompt_tokens": 649, "batched": {"requests": 64, "batch_size": 32, "output_tok_s": 100.0,
                                             "prompt_tokens_each": [649], "cache_implementation": "static"}}
    assert gc.prompt_tokens_check(eng, hf)["match"] is True
    target = gc.targets_summary(eng, hf)["concurrency64_vs_hf_throughput"]
    assert target["measured"] == 20.0 and target["met"] is True and target["hf_batch_size"] == 32
    check = gc.prompt_tokens_check(eng, {**hf, "prompt_tokens": 672})
    assert check["match"] is False and "not like for like" in check["warning"]
    no_batches = gc.targets_summary(eng, {"decode_tok_s_best": 30.0, "ttft_median_s": 0.09})
    assert no_batches["concurrency64_vs_hf_throughput"]["measured"] is None  # nothing modelled in its place


def test_both_sides_time_the_same_prompt_from_the_callers_call(tiny_checkpoint):
    """Our engine and the transformers pipeline get the same prompt text and image bytes and see the same number of
    prompt tokens; our TTFT from the call includes the image work the engine's own clock starts after."""
    from xgenmm import LLM, SamplingParams
    from xgenmm.client import open_engine
    from xgenmm.multimodal.image_processing import ImageProcessor
    from xgenmm.tokenizer import load_tokenizer

    gc = _load()
    cpu = torch.device("cpu")
    data = gc.image_bytes(gc.ttft_seed(0))
    assert data[:2] == b"\xff\xd8"  # JPEG bytes, as a user sends them
    handle = open_engine("native", str(tiny_checkpoint), "cpu", "float32", shared=False)
    try:
        llm = LLM.from_handle(handle)
        request = {"prompt": gc.IMAGE_PROMPT, "multi_modal_data": {"image": data}}
        outs, t_call = gc.generate_from_call(llm, request, SamplingParams(temperature=0.0, max_tokens=1))
        metrics = outs[0].metrics
        assert metrics.first_token_time - t_call > metrics.time_to_first_token > 0
        model = handle.core.model
        pipe = gc.HfPipeline(gc._hf_phi3(tiny_checkpoint, cpu, torch.float32, "sdpa"), load_tokenizer(tiny_checkpoint),
                             ImageProcessor.from_pretrained(str(tiny_checkpoint)), model, cpu, torch.float32)
        (embeds,) = pipe.prompt_embeds(gc.IMAGE_PROMPT, [data])
        assert embeds.shape[0] == metrics.num_prompt_tokens
        batched = gc.hf_batched_throughput(pipe, requests=2, max_new_tokens=2, cache="static")
        assert batched["batch_shapes"] == [[2, metrics.num_prompt_tokens]] and batched["generated_tokens"] == 4
        assert batched["cache_implementation"] == "static" and batched["stepped_down"] == []
        assert batched["prompt_tokens_each"] == [metrics.num_prompt_tokens] and batched["output_tok_s"] > 0
    finally:
        handle.shutdown()
