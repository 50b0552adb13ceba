"""Weight-only quantization on CPU, side by side in one run: single-stream and 8-concurrent decode tok/s, load time and
peak RSS of the same checkpoint served unquantized (bf16, and float32 where memory allows) and quantized (int8, int4).

Fair on a shared machine: every configuration runs in its own fresh process (peak RSS is that process's own), one at
a time, in interleaved rounds (bf16, int8, int4, bf16, int8, int4, ...), so a slow phase of the machine hits every
configuration alike; each figure is the median over the rounds with its min-max spread, and each ratio is taken
from those medians, absolute tok/s beside it. The memory read bandwidth is probed (best `sum` over a 1 GiB tensor)
right before and after each run, and reported with it. The KV pool is the same fixed size for every configuration.
The quantized runs keep their weights in `--quantized-cache-dir`: the first round quantizes (timed), the later rounds
read the cache (timed too).

    .venv/bin/python benchmarks/quantization_cpu.py --model /path/to/bf16-checkpoint --rounds 3
    .venv/bin/python benchmarks/quantization_cpu.py --preset scaled    # makes a random checkpoint once
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # name -> (model dtype, quantization)
    "bf16": ("bfloat16", None),
    "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),
    "float32": ("float32", None),
}
SYSTEM = "<|system|>\nYou are a helpful assistant.<|end|>\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> dict:
    import torch

    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
            "amx": bool(torch.cpu._is_amx_tile_supported()), "threads": torch.get_num_threads()}


def bandwidth_gb_s(gib: float = 1.0, repeats: int = 5) -> float:
    """Best read bandwidth: `sum` over a float32 tensor much larger than the caches."""
    import torch

    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_one(args) -> dict:
    """One configuration in this (fresh) process: load, single-stream decode, concurrent decode."""
    import torch

    from xgenmm import LLM, SamplingParams
    from xgenmm.client import open_engine

    dtype, quantization = CONFIGS[args.config]
    options = {"kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}
    if quantization:
        options.update(quantization=quantization, quantized_cache_dir=args.quantized_cache_dir)
    t0 = time.perf_counter()
    loop = open_engine("native", args.model, "cpu", dtype, shared=False, **options)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_bytes()
    model = loop.core.model
    lm_bytes = sum(t.numel() * t.element_size() for m in (model.language_model,)
                   for t in (*m.parameters(), *m.buffers()))
    head = model.lm_head_quantized if model.lm_head_quantized is not None else None
    head_bytes = (sum(t.numel() * t.element_size() for t in head.buffers()) if head is not None
                  else model.lm_head_weight.numel() * model.lm_head_weight.element_size())
    vision_bytes = sum(t.numel() * t.element_size() for t in (*model.vision.parameters(), *model.vision.buffers()))
    llm = LLM.from_handle(loop)
    llm.generate(f"{SYSTEM}<|user|>\nwarm up<|end|>\n<|assistant|>\n", SamplingParams(temperature=0.0, max_tokens=2))

    prompt = f"{SYSTEM}<|user|>\nWrite a long story about a lighthouse keeper and the sea.<|end|>\n<|assistant|>\n"
    params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
    out = llm.generate(prompt, params)[0]
    single = (len(out.outputs[0].token_ids) - 1) / (out.metrics.finished_time - out.metrics.first_token_time)

    n = args.concurrent
    prompts = [f"{SYSTEM}<|user|>\nQuestion {i}: write a long story about the number {i}.<|end|>\n<|assistant|>\n"
               for i in range(n)]
    cparams = SamplingParams(temperature=0.0, max_tokens=args.concurrent_tokens, ignore_eos=True)
    outs = llm.generate(prompts, cparams)
    window = statistics.median(o.metrics.finished_time - o.metrics.first_token_time for o in outs)
    concurrent = n * (args.concurrent_tokens - 1) / window
    loop.shutdown()
    return {"config": args.config, "dtype": dtype, "quantization": quantization, "load_s": round(load_s, 2),
            "single_stream_tok_s": round(single, 3), "concurrent_tok_s": round(concurrent, 3),
            "peak_rss_gb": round(peak_rss_bytes() / 1e9, 3), "rss_after_load_gb": round(rss_loaded / 1e9, 3),
            "language_model_bytes_gb": round(lm_bytes / 1e9, 3), "lm_head_bytes_gb": round(head_bytes / 1e9, 3),
            "vision_bytes_gb": round(vision_bytes / 1e9, 3),
            "first_tokens": out.outputs[0].token_ids[:8], "torch_threads": torch.get_num_threads()}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "values": values}


RATIO_KEYS = ("single_stream_tok_s", "concurrent_tok_s", "peak_rss_gb")


def summarize(report: dict) -> dict:
    """Medians (min-max) per configuration, each ratio to bf16 both as the ratio of the medians and as the median of
    the per-round paired ratios (each run against the same round's bf16 run: the fairer one on a machine whose speed
    drifts between rounds), and the fraction of the probed bandwidth each single-stream run read. Prints the table."""
    configs = report["configs"]
    summary = {}
    for config in configs:
        runs = [x for x in report["runs"] if x["config"] == config]
        summary[config] = {key: spread([x[key] for x in runs])
                           for key in ("single_stream_tok_s", "concurrent_tok_s", "peak_rss_gb", "load_s")}
        summary[config]["weights_gb"] = round(runs[0]["language_model_bytes_gb"] + runs[0]["lm_head_bytes_gb"], 3)
        # the LM weights a single-stream step reads, against the bandwidth probed around that run
        summary[config]["single_stream_read_fraction"] = spread([
            round(summary[config]["weights_gb"] * x["single_stream_tok_s"] / statistics.mean(x["bandwidth_gb_s"]), 3)
            for x in runs])
    base = "bf16" if "bf16" in summary else configs[0]
    base_runs = {x["round"]: x for x in report["runs"] if x["config"] == base}
    for config in configs:
        s = summary[config]
        s["vs_" + base] = {key: round(s[key]["median"] / summary[base][key]["median"], 3) for key in RATIO_KEYS}
        s["paired_vs_" + base] = {key: spread([round(x[key] / base_runs[x["round"]][key], 3)
                                               for x in report["runs"] if x["config"] == config
                                               and x["round"] in base_runs]) for key in RATIO_KEYS}
    report["summary"] = summary
    report["same_first_tokens"] = {c: [x["first_tokens"] for x in report["runs"] if x["config"] == c][0]
                                   for c in configs}
    for config in configs:
        s, paired = summary[config], summary[config]["paired_vs_" + base]
        print(f"{config}: single {s['single_stream_tok_s']['median']} tok/s (paired {paired['single_stream_tok_s']['median']}x "
              f"{paired['single_stream_tok_s']['values']}), {report['concurrent']} concurrent "
              f"{s['concurrent_tok_s']['median']} tok/s (paired {paired['concurrent_tok_s']['median']}x "
              f"{paired['concurrent_tok_s']['values']}), peak RSS {s['peak_rss_gb']['median']} GB "
              f"({paired['peak_rss_gb']['median']}x)")
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bf16 / float32 checkpoint directory (default: a random one of --preset, made once)")
    ap.add_argument("--preset", default="scaled", help="random checkpoint preset when --model is not given")
    ap.add_argument("--configs", default="bf16,int8,int4", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=256, help="single-stream decode length (>= 256: a long decode)")
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--concurrent-tokens", type=int, default=16)
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--quantized-cache-dir", default=str(ROOT / ".cache" / "quantized"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantization_cpu.json"))
    ap.add_argument("--summarize", metavar="JSON", help="recompute the summary of a saved (possibly partial) run")
    ap.add_argument("--config", help=argparse.SUPPRESS)  # child mode: run one configuration, print JSON
    args = ap.parse_args(argv)
    if args.summarize:
        report = json.loads(Path(args.summarize).read_text())
        summarize(report)
        Path(args.summarize).write_text(json.dumps(report, indent=1))
        return report

    sys.path.insert(0, str(ROOT / "core"))
    if args.config:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return {}

    if not args.model:
        from xgenmm.testing import make_random_checkpoint

        path = ROOT / ".cache" / f"random-{args.preset}-bf16"
        if not (path / "config.json").is_file():
            make_random_checkpoint(path, preset=args.preset, dtype="bfloat16")
        args.model = str(path)
    configs = args.configs.split(",")
    report = {"cpu": cpu_name(), "cpu_features": cpu_features(), "model": args.model, "configs": configs,
              "rounds": args.rounds, "decode_tokens": args.decode_tokens, "concurrent": args.concurrent,
              "concurrent_tokens": args.concurrent_tokens, "kv_cache_gib": args.kv_cache_gib,
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "runs": []}
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'core'}:{ROOT}", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for r in range(args.rounds):
        for config in configs:
            before = bandwidth_gb_s()
            cmd = [sys.executable, __file__, "--config", config, "--model", args.model,
                   "--decode-tokens", str(args.decode_tokens), "--concurrent", str(args.concurrent),
                   "--concurrent-tokens", str(args.concurrent_tokens), "--kv-cache-gib", str(args.kv_cache_gib),
                   "--quantized-cache-dir", args.quantized_cache_dir]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            after = bandwidth_gb_s()
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            run = {"round": r, **json.loads(lines[-1][7:]), "bandwidth_gb_s": [round(before, 2), round(after, 2)]}
            report["runs"].append(run)
            print(f"round {r} {config}: single {run['single_stream_tok_s']:.2f} tok/s, {args.concurrent} concurrent "
                  f"{run['concurrent_tok_s']:.2f} tok/s, load {run['load_s']:.1f} s, peak RSS "
                  f"{run['peak_rss_gb']:.2f} GB, bandwidth {before:.1f}/{after:.1f} GB/s", flush=True)
            Path(args.out).write_text(json.dumps(report, indent=1))  # partial results survive an interruption

    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    summarize(report)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
