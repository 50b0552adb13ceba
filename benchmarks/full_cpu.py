"""The full-size model (the real 4.4 B-parameter geometry) on CPU, each figure beside the machine's limit measured in
the same run.

* machine limits: memory read bandwidth (best `sum` over a 2 GiB tensor, probed before loading, after loading and at
  the end: the machine is shared and its bandwidth varies, the best probe is the limit) and the bf16 GEMM rate (best
  oneDNN `linear` at 2048 x 3072 x 8192);
* load: wall time and peak RSS of building the engine (weights read tensor by tensor from float32 or bf16 shards),
  beside the weights' bytes in the target dtype plus the KV pool (target: peak <= 1.2x that);
* first token of one 5-crop image (640x480: 2x2 grid + base), timed from the call, split into image preparation,
  vision (SigLIP + perceiver) and prefill; the vision + prefill FLOPs over their time as a fraction of the GEMM rate
  (target >= 50%);
* single-stream decode: tokens/s after that image, and the bytes a decode step must read (language-model weights, LM
  head, the KV cache so far) over the step time as a fraction of the best probe; then `--windows` short decode
  windows of the same request, each between two bandwidth probes. The bandwidth this shared machine leaves us flips
  between two states (~35 and ~65 GB/s) every few seconds, so the target (>= 70%) is judged at the same moment:
  windows whose two probes agree, against them; and windows in the fast state against the run's best probe;
* 8 concurrent text requests decoding together: output tokens/s beside the step's limit (weights once per step +
  every sequence's KV at the bandwidth, or its FLOPs at the GEMM rate, whichever is larger).

    .venv/bin/python benchmarks/full_cpu.py --model /path/to/checkpoint        # float32 or bf16 shards
    .venv/bin/python benchmarks/full_cpu.py                                     # makes a random `full` checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def measure_bandwidth(gib: float = 2.0, repeats: int = 7) -> float:
    """Best read bandwidth (bytes/s): `sum` over a float32 tensor much larger than the caches, on 2 MiB pages where
    our kernels can map them (the engine's weights and KV cache are; 4 KiB pages read ~10% slower here)."""
    from xgenmm.cpu_kernels import empty_hugepages

    x = empty_hugepages((int(gib * 2**30) // 4,), torch.float32).fill_(1.0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def decode_window(window_s: float, probe_before: float, probe_after: float, step_bytes: float) -> dict:
    """One decode window between two bandwidth probes (bytes/s). Stable: the probes agree within 10% (the machine did
    not change state in between), and the window is held against their mean; otherwise against the larger."""
    stable = abs(probe_before - probe_after) <= 0.1 * max(probe_before, probe_after)
    adjacent = (probe_before + probe_after) / 2 if stable else max(probe_before, probe_after)
    return {"tok_s": round(1 / window_s, 3), "probes_gb_s": [round(probe_before / 1e9, 2), round(probe_after / 1e9, 2)],
            "stable": stable, "fraction_of_adjacent_bandwidth": round(step_bytes / window_s / adjacent, 3)}


def fast_state_summary(windows: list[dict], best_probe: float, step_bytes: float) -> dict:
    """The stable windows taken in the machine's fast state (both probes within 10% of the run's best probe): their
    median decode rate, and that rate's read bandwidth as a fraction of the best probe (None without such windows)."""
    fast = [w for w in windows if w["stable"] and min(w["probes_gb_s"]) * 1e9 >= 0.9 * best_probe]
    tok_s = round(statistics.median(w["tok_s"] for w in fast), 3) if fast else None
    return {"fast_windows": len(fast), "fast_windows_median_tok_s": tok_s,
            "fast_windows_fraction_of_best_probe": round(tok_s * step_bytes / best_probe, 3) if tok_s else None}


def measure_gemm_rate(dtype: torch.dtype, m: int = 2048, k: int = 3072, n: int = 8192, repeats: int = 5) -> float:
    """Best oneDNN GEMM rate (FLOP/s) at a prefill-sized shape in `dtype`."""
    x, w = torch.randn(m, k).to(dtype), (torch.randn(n, k) * 0.02).to(dtype)
    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def perceiver_linear_flops(perceiver, n_media: int, n_latents: int) -> int:
    """The perceiver's linear-layer FLOPs for one crop: only `to_kv` reads the media tokens and the latents
    (n_media + n_latents rows); `to_q`, `to_out`, the feed-forward and the projection run on the latents alone.
    (Charging every parameter against all n_media + n_latents rows, as this script did, counted ~3.3x the work.)"""
    flops = 0
    for name, sub in perceiver.named_modules():
        if isinstance(sub, torch.nn.Linear):
            rows = n_media + n_latents if name.endswith("to_kv") else n_latents
            flops += 2 * rows * sub.weight.numel()
    return flops


def siglip_flops_per_crop(tower, cfg) -> int:
    """SigLIP on one 384x384 crop: every parameter once per patch token (n = 729), plus attention's QK^T and PV."""
    v = cfg.vision
    n = (v["image_size"] // v["patch_size"]) ** 2
    params = sum(p.numel() for p in tower.parameters())
    return 2 * params * n + 4 * n * n * v["hidden_size"] * v["num_hidden_layers"]


def resampler_flops_per_crop(perceiver, cfg) -> int:
    """The perceiver on one crop's n media tokens: its linears (`perceiver_linear_flops`: only `to_kv` on the
    n + 128 rows) plus the latents' attention over the n + 128 keys."""
    v, pc = cfg.vision, cfg.perceiver
    n = (v["image_size"] // v["patch_size"]) ** 2
    lat = pc.num_latents
    return perceiver_linear_flops(perceiver, n, lat) + 4 * lat * (n + lat) * pc.heads * pc.dim_head * pc.depth


def model_costs(model) -> dict:
    """Bytes a decode step reads per token (LM weights + head) and FLOPs per LM token / per vision crop."""
    lm_params = sum(p.numel() for p in model.language_model.parameters())
    head = model.lm_head_weight.numel() + model.lm_head_bias.numel()
    elem = model.lm_head_weight.element_size()
    cfg = model.config
    vision_flops = siglip_flops_per_crop(model.vision.vision_encoder, cfg) + resampler_flops_per_crop(
        model.vision.vision_tokenizer, cfg)
    t = cfg.text
    return {"decode_weight_bytes": (lm_params + head) * elem, "lm_flops_per_token": 2 * lm_params,
            "head_flops": 2 * head, "vision_flops_per_crop": vision_flops,
            "kv_bytes_per_token": 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * elem}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a random `full` checkpoint, made once)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--windows", type=int, default=16, help="single-stream decode windows between bandwidth probes")
    ap.add_argument("--window-tokens", type=int, default=5, help="tokens per window (a window should not outlast "
                    "one state of the machine's bandwidth: a few seconds here)")
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "full_cpu.json"))
    args = ap.parse_args(argv)

    from throughput import SYSTEM, make_image

    from xgenmm import LLM, SamplingParams
    from xgenmm.placement import resolve_dtype
    from xgenmm.client import open_engine

    dtype = resolve_dtype(args.dtype, None, torch.device("cpu"))
    model_dir = args.model
    if model_dir is None:
        from xgenmm.testing import make_random_checkpoint

        cache = Path(os.environ.get("XGENMM_BENCH_CACHE", "/tmp/xgenmm-bench"))
        model_dir = cache / "full-seed0"
        if not (model_dir / "config.json").exists():
            make_random_checkpoint(model_dir, preset="full", seed=0, dtype="bfloat16", num_shards=4)
    model_dir = str(model_dir)
    report: dict = {"benchmark": "full_cpu", "model": model_dir, "dtype": str(dtype).removeprefix("torch."),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                    "loadavg_start": os.getloadavg()}

    # ---- machine limits (before loading: the full memory is free) -----------------------------------------------
    # The bandwidth of this shared machine varies with its neighbours' load: it is probed again after loading and at
    # the end, and the best of the probes is the limit every fraction below is taken against.
    bandwidth_probes = [measure_bandwidth()]
    bandwidth = bandwidth_probes[0]
    gemm = measure_gemm_rate(dtype)
    report["limits"] = {"read_bandwidth_gb_s": round(bandwidth / 1e9, 2), "gemm_tflop_s": round(gemm / 1e12, 4)}
    print(f"limits: read bandwidth {bandwidth / 1e9:.1f} GB/s, {report['dtype']} GEMM {gemm / 1e9:.0f} GFLOP/s", flush=True)

    # ---- load -----------------------------------------------------------------------------------------------------
    reset_peak_rss()
    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    handle = open_engine("native", model_dir, "cpu", str(dtype).removeprefix("torch."),
                              kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30), max_num_seqs=max(8, args.concurrent), shared=False)
    load_s = time.perf_counter() - t0
    engine = handle.core
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    kv_bytes = engine.runner.kv_cache_bytes
    peak = peak_rss_bytes()
    report["load"] = {"seconds": round(load_s, 1), "peak_rss_gb": round(peak / 1e9, 2),
                      "rss_before_gb": round(rss_before / 1e9, 2), "weights_gb": round(weight_bytes / 1e9, 2),
                      "kv_pool_gb": round(kv_bytes / 1e9, 2),
                      "peak_over_weights_plus_kv": round(peak / (weight_bytes + kv_bytes), 3),
                      "linear_kernel": engine.model.linear_kernel, "attention_backend": engine.runner.backend.name}
    print(f"load: {load_s:.1f} s, peak RSS {peak / 1e9:.2f} GB = {report['load']['peak_over_weights_plus_kv']:.3f}x "
          f"(weights {weight_bytes / 1e9:.2f} GB + KV {kv_bytes / 1e9:.2f} GB)", flush=True)
    bandwidth_probes.append(measure_bandwidth(1.0))
    bandwidth = max(bandwidth_probes)
    costs = model_costs(engine.model)
    report["model_costs"] = costs
    llm = LLM.from_handle(handle)
    greedy = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate("<|user|>\nwarm up<|end|>\n<|assistant|>\n", greedy)  # first-call allocations

    # ---- first token of a 5-crop image, then single-stream decode ---------------------------------------------
    image = make_image(7, (640, 480))
    prompt = {"prompt": f"{SYSTEM}<|user|>\n<image>\nDescribe this picture in detail.<|end|>\n<|assistant|>\n",
              "multi_modal_data": {"image": image}}
    t_prep = time.perf_counter()
    prepared = handle.prepare(prompt, greedy, "probe")
    prep_s = time.perf_counter() - t_prep
    crops = prepared.images[0].num_patches
    t_vis = time.perf_counter()
    engine.runner.encode_images(prepared.images)
    vision_s = time.perf_counter() - t_vis
    engine.vision.cache.clear()
    prompt_tokens = len(prepared.fused.token_ids)
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    t_call = time.monotonic()
    out = llm.generate(prompt, params)[0]
    ttft = out.metrics.first_token_time - t_call  # from the call: preparation, vision and prefill
    stamps = out.outputs[0].token_ids
    decode_s = (out.metrics.finished_time - out.metrics.first_token_time) / (len(stamps) - 1)
    prefill_s = ttft - prep_s - vision_s
    vision_flops = costs["vision_flops_per_crop"] * crops
    prefill_flops = costs["lm_flops_per_token"] * prompt_tokens + costs["head_flops"]
    mean_context = prompt_tokens + len(stamps) / 2
    step_bytes = costs["decode_weight_bytes"] + costs["kv_bytes_per_token"] * mean_context
    report["image_first_token"] = {
        "crops": crops, "prompt_tokens": prompt_tokens, "ttft_s": round(ttft, 2), "preparation_s": round(prep_s, 3),
        "vision_s": round(vision_s, 2), "prefill_s": round(prefill_s, 2),
        "vision_tflop": round(vision_flops / 1e12, 3), "prefill_tflop": round(prefill_flops / 1e12, 3),
        "vision_fraction_of_gemm_rate": round(vision_flops / vision_s / gemm, 3),
        "prefill_fraction_of_gemm_rate": round(prefill_flops / prefill_s / gemm, 3),
        "vision_and_prefill_fraction_of_gemm_rate": round((vision_flops + prefill_flops) / (vision_s + prefill_s) / gemm, 3),
    }
    # The same request again (its image and prompt now come from the caches), `--windows` times, a few tokens each,
    # every window between two bandwidth probes. This shared machine's bandwidth flips between two states (~35 and
    # ~65 GB/s here) every few seconds, so a long decode mixes them while a probe sees one: a window is held against
    # the probes right around it, and only windows whose two probes agree (within 10%: the state did not change
    # in between) are counted. Windows in the fast state (both probes within 10% of the run's best) are also held
    # against the best probe itself.
    windows = []
    short = SamplingParams(temperature=0.0, max_tokens=args.window_tokens, ignore_eos=True)
    for _ in range(args.windows):
        probe_before = measure_bandwidth(1.0, repeats=3)
        again = llm.generate(prompt, short)[0]
        window_s = (again.metrics.finished_time - again.metrics.first_token_time) / (len(again.outputs[0].token_ids) - 1)
        probe_after = measure_bandwidth(1.0, repeats=3)
        bandwidth_probes += [probe_before, probe_after]
        windows.append(decode_window(window_s, probe_before, probe_after, step_bytes))
    bandwidth = max(bandwidth_probes)
    stable_windows = [w for w in windows if w["stable"]]
    report["single_stream_decode"] = {
        "tokens": len(stamps), "s_per_token": round(decode_s, 4), "tok_s": round(1 / decode_s, 3),
        "bytes_per_step_gb": round(step_bytes / 1e9, 3), "limit_tok_s": round(bandwidth / step_bytes, 3),
        "fraction_of_bandwidth": round(step_bytes / decode_s / bandwidth, 3),
        "windows": windows,
        "stable_windows": len(stable_windows),
        "median_fraction_of_adjacent_bandwidth": round(statistics.median(
            w["fraction_of_adjacent_bandwidth"] for w in stable_windows), 3) if stable_windows else None,
    }  # fmt: skip
    print(f"5-crop image: TTFT {ttft:.2f} s (prep {prep_s:.2f}, vision {vision_s:.2f}, prefill {prefill_s:.2f}); "
          f"vision+prefill at {report['image_first_token']['vision_and_prefill_fraction_of_gemm_rate']:.0%} of the "
          f"GEMM rate", flush=True)
    print(f"single stream: {1 / decode_s:.2f} tok/s = {report['single_stream_decode']['fraction_of_bandwidth']:.0%} "
          f"of the bandwidth limit ({bandwidth / step_bytes:.2f} tok/s); windows between probes: "
          + ", ".join(f"{w['tok_s']:.2f} tok/s = {w['fraction_of_adjacent_bandwidth']:.0%} of "
                      f"{'/'.join(f'{b:.0f}' for b in w['probes_gb_s'])} GB/s{'' if w['stable'] else ' (unstable)'}"
                      for w in windows), flush=True)  # fmt: skip

    # ---- concurrent text requests decoding together ----------------------------------------------------------------
    # One batch: every prompt is prefilled in the first step, then all decode together; each request's time from its
    # first to its last token is pure decoding of the whole batch.
    n = args.concurrent
    prompts = [f"{SYSTEM}<|user|>\nQuestion {i}: write a long story about the number {i}.<|end|>\n<|assistant|>\n"
               for i in range(n)]
    outs = llm.generate(prompts, params)
    window = statistics.median(o.metrics.finished_time - o.metrics.first_token_time for o in outs)
    rate = n * (args.decode_tokens - 1) / window
    text_tokens = outs[0].metrics.num_prompt_tokens
    step_bytes_n = costs["decode_weight_bytes"] + n * costs["kv_bytes_per_token"] * (text_tokens + args.decode_tokens / 2)
    step_flops_n = n * (costs["lm_flops_per_token"] + costs["head_flops"])
    step_limit_s = max(step_bytes_n / bandwidth, step_flops_n / gemm)
    report["concurrent_decode"] = {
        "requests": n, "prompt_tokens": text_tokens, "tok_s": round(rate, 3), "limit_tok_s": round(n / step_limit_s, 3),
        "fraction_of_limit": round(rate / (n / step_limit_s), 3),
        "limit_is": "bandwidth" if step_bytes_n / bandwidth >= step_flops_n / gemm else "gemm rate",
    }
    print(f"{n} concurrent: {rate:.2f} tok/s = {report['concurrent_decode']['fraction_of_limit']:.0%} of the limit "
          f"({n / step_limit_s:.2f} tok/s, {report['concurrent_decode']['limit_is']})", flush=True)
    handle.shutdown()
    bandwidth_probes.append(measure_bandwidth(1.0))
    report["limits"]["read_bandwidth_probes_gb_s"] = [round(b / 1e9, 2) for b in bandwidth_probes]
    if max(bandwidth_probes) > bandwidth:  # the last probe was the best: take every fraction against it
        scale = bandwidth / max(bandwidth_probes)
        for key in ("single_stream_decode", "concurrent_decode"):
            sec = report[key]
            frac_key = "fraction_of_bandwidth" if key == "single_stream_decode" else "fraction_of_limit"
            if key == "single_stream_decode" or sec.get("limit_is") == "bandwidth":
                sec[frac_key] = round(sec[frac_key] * scale, 3)
                sec["limit_tok_s"] = round(sec["limit_tok_s"] / scale, 3)
        bandwidth = max(bandwidth_probes)
    report["limits"]["read_bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
    single = report["single_stream_decode"]
    single.update(fast_state_summary(single["windows"], bandwidth, step_bytes))
    fast_tok_s = single["fast_windows_median_tok_s"]
    report["loadavg_end"] = os.getloadavg()
    report["targets"] = {
        "peak_rss_le_1_2x_weights_plus_kv": report["load"]["peak_over_weights_plus_kv"] <= 1.2,
        # the bandwidth at the same moment: stable windows against the probes around them
        "single_stream_ge_70pct_of_bandwidth_at_the_same_moment": (single["median_fraction_of_adjacent_bandwidth"]
                                                                   or 0) >= 0.7,
        # in the machine's fast state, against the best probe of the whole run (None: no fast window occurred)
        "single_stream_fast_windows_ge_70pct_of_best_probe": None if fast_tok_s is None
        else single["fast_windows_fraction_of_best_probe"] >= 0.7,
        # one long decode against the best probe, whatever state each was taken in (mixes the two states)
        "single_stream_long_decode_ge_70pct_of_best_probe": single["fraction_of_bandwidth"] >= 0.7,
        "image_prefill_ge_50pct_gemm": report["image_first_token"]["vision_and_prefill_fraction_of_gemm_rate"] >= 0.5,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"bandwidth probes {report['limits']['read_bandwidth_probes_gb_s']} GB/s (limit: the best); single stream "
          f"{report['single_stream_decode']['fraction_of_bandwidth']:.0%} of its limit, {n} concurrent "
          f"{report['concurrent_decode']['fraction_of_limit']:.0%} of theirs")
    print(json.dumps(report["targets"]))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
