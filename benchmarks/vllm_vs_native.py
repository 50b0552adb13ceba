"""Native engine vs the vLLM backend on the same CPU, side by side in one run: output tokens/s and time to first token.

Both engines run the same random checkpoint (`--preset scaled` by default: the real widths at a quarter of the depth,
see `xgenmm/testing/presets.py`) in the same dtype (`--dtype auto`: bf16 where the CPU computes it natively, as
vLLM's CPU backend runs by default there), greedy, through the same front end (`xgenmm.LLM(..., backend=...)` on `xgenmm.client.open_engine`),
each in its own subprocess so neither inherits the other's thread settings, with the same KV-cache budget and vLLM's
defaults otherwise. Each engine uses the best kernels it has: vLLM its oneDNN linears (pre-packed weights) and C++
paged attention; native its oneDNN / bf16 linears and in-place paged attention; the vision tower (our
`VisionEncoder`, the same code in both) runs on oneDNN linears in both. Workloads:

* `text`: a batch of text-only requests (prompt ~`--text-prompt-tokens`, `--text-max-tokens` out, ignore_eos);
* `image`: a batch of one-image chat requests (a 640x480 picture: 2x2 grid, 5 patches, 640 vision tokens);
* `ttft`: single requests, one at a time (streamed): time to the first output, text-only and with the image.

Every time to first token runs from the caller's call (request preparation, image decoding and tiling included) for
both engines. Engines: `native`; `vllm` (vLLM's CPU defaults: it reserves one core per rank for its scheduler / front
end, so on 2 cores it computes with 1 thread); `vllm-all-cores` (VLLM_CPU_NUM_OF_RESERVED_CPU=0: both cores compute,
fairer here since the native engine runs in-process).

Run it in the vLLM venv (it has both engines):  .venv-vllm/bin/python benchmarks/vllm_vs_native.py
Writes benchmarks/results/vllm_vs_native.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "vllm_vs_native.json"
IMAGE_WH = (640, 480)


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


def run_engine(backend: str, checkpoint: str, args) -> dict:
    """One engine, all workloads (called in a subprocess)."""
    import torch

    from xgenmm import LLM, SamplingParams
    from xgenmm.client import open_engine

    t0 = time.perf_counter()
    options = {"kv_cache_memory_bytes": int(args.kv_cache_gib * 1024**3)}
    engine = open_engine(backend, checkpoint, "cpu", args.dtype, **options)
    start_s = time.perf_counter() - t0
    llm = LLM.from_handle(engine)
    tok = engine.tokenizer
    image = _image()
    result: dict = {"engine_start_s": round(start_s, 2), "torch_threads": torch.get_num_threads(),
                    "loadavg_at_start": os.getloadavg()}

    # warm up both paths (first-call allocations, kernel selection) before timing anything
    llm.generate([_text_prompt(tok, 16, 0)], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
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

    text_params = SamplingParams(temperature=0.0, max_tokens=args.text_max_tokens, ignore_eos=True)
    result["text"] = batch(lambda a: [_text_prompt(tok, args.text_prompt_tokens, 37 * a + i)
                                      for i in range(args.text_requests)], text_params, chat=False)
    image_params = SamplingParams(temperature=0.0, max_tokens=args.image_max_tokens, ignore_eos=True)
    result["image"] = batch(lambda a: [_chat(_image().rotate(7 * i + 3 * a + 1), 10 * a + i)
                                       for i in range(args.image_requests)], image_params, chat=True)

    single = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    text_ttft = [_ttft(lambda: llm.stream(_text_prompt(tok, args.text_prompt_tokens, 100 + i), single))
                 for i in range(5)]
    images = [_image().rotate(90 + 11 * i) for i in range(5)]
    img_ttft = [_ttft(lambda: llm.chat_stream(_chat(images[i], 100 + i), single)) for i in range(5)]
    result["ttft"] = {"text_single_median_s": round(statistics.median(text_ttft), 3),
                      "image_single_median_s": round(statistics.median(img_ttft), 3)}
    result["loadavg_at_end"] = os.getloadavg()
    return result


def _child(args) -> None:
    print(json.dumps(run_engine(args.engine, args.checkpoint, args)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="scaled", choices=["tiny", "small", "scaled", "full"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="both engines' dtype; auto = bfloat16 where the CPU computes it natively, else float32")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV-cache budget of each engine")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--text-requests", type=int, default=16)
    parser.add_argument("--text-prompt-tokens", type=int, default=64)
    parser.add_argument("--text-max-tokens", type=int, default=64)
    parser.add_argument("--image-requests", type=int, default=4)
    parser.add_argument("--image-max-tokens", type=int, default=32)
    parser.add_argument("--engines", default="native,vllm,vllm-all-cores")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return _child(args)

    import torch

    from xgenmm.placement import resolve_dtype
    from xgenmm.testing import make_random_checkpoint

    args.dtype = str(resolve_dtype(args.dtype, None, torch.device("cpu"))).removeprefix("torch.")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    report: dict = {
        "benchmark": "vllm_vs_native",
        "preset": args.preset,
        "dtype": args.dtype,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("engine", "checkpoint", "output")},
        "engines": {},
    }
    try:
        import torch

        report["machine"]["torch"] = torch.__version__
        import vllm

        report["machine"]["vllm"] = vllm.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_random_checkpoint(Path(tmp) / args.preset, preset=args.preset, seed=0,
                                      dtype="bfloat16" if args.preset in ("scaled", "full") else "float32")
        passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                       if k not in ("engine", "checkpoint", "output", "engines", "preset", "rounds")]
        names = args.engines.split(",")
        runs: dict[str, list[dict]] = {name: [] for name in names}
        # The 2 cores are shared with other work: rounds interleave the engines, and medians are reported.
        for round_index in range(args.rounds):
            for name in names:
                backend = "vllm" if name.startswith("vllm") else name
                child_env = dict(env, VLLM_CPU_NUM_OF_RESERVED_CPU="0") if name == "vllm-all-cores" else env
                cmd = [sys.executable, __file__, f"--engine={backend}", f"--checkpoint={ckpt}", *passthrough]
                print(f"[bench] round {round_index + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True)
                if proc.returncode != 0:
                    runs[name].append({"error": proc.stderr[-3000:]})
                    continue
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        for name, results in runs.items():
            ok = [r for r in results if "error" not in r]
            # a fresh summary dict: it must not be one of the round dicts it then lists (a cycle json cannot write)
            summary = _median(ok) if ok else {"error": "every round failed"}
            summary["rounds"] = list(results)
            report["engines"][name] = summary
        report["ratios"] = _ratios(report["engines"])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    print(f"wrote {out}")


def _median(results: list[dict]) -> dict:
    """Per-metric median over rounds (nested dicts of numbers), always a new dict (one round included)."""
    first = results[0]
    out: dict = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = _median([r[key] for r in results])
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            out[key] = round(statistics.median(r[key] for r in results), 3)
        else:
            out[key] = json.loads(json.dumps(value))
    return out


def _ratios(engines: dict) -> dict:
    """native / vLLM for every throughput, vLLM / native for every time (> 1 = native better), per vLLM variant."""
    native = engines.get("native", {})
    out = {}
    for name, other in engines.items():
        if name == "native" or "error" in other or "error" in native:
            continue
        try:
            out[f"native_vs_{name}"] = {
                "text_output_tok_s": round(native["text"]["output_tok_per_s"] / other["text"]["output_tok_per_s"], 3),
                "image_output_tok_s": round(native["image"]["output_tok_per_s"] / other["image"]["output_tok_per_s"], 3),
                "text_ttft_in_batch": round(other["text"]["ttft_in_batch_mean_s"] / native["text"]["ttft_in_batch_mean_s"], 3),
                "image_ttft_in_batch": round(other["image"]["ttft_in_batch_mean_s"] / native["image"]["ttft_in_batch_mean_s"], 3),
                "ttft_single_text": round(other["ttft"]["text_single_median_s"] / native["ttft"]["text_single_median_s"], 3),
                "ttft_single_image": round(other["ttft"]["image_single_median_s"] / native["ttft"]["image_single_median_s"], 3),
            }
        except (KeyError, TypeError, ZeroDivisionError):
            continue
    return out


def _print_table(report: dict) -> None:
    engines = report["engines"]
    rows = [("engine start (s)", lambda r: r["engine_start_s"]),
            ("text: output tok/s", lambda r: r["text"]["output_tok_per_s"]),
            ("text: mean TTFT in batch (s)", lambda r: r["text"]["ttft_in_batch_mean_s"]),
            ("image: output tok/s", lambda r: r["image"]["output_tok_per_s"]),
            ("image: total tok/s (prompt+output)", lambda r: r["image"]["total_tok_per_s"]),
            ("image: mean TTFT in batch (s)", lambda r: r["image"]["ttft_in_batch_mean_s"]),
            ("TTFT single text (s)", lambda r: r["ttft"]["text_single_median_s"]),
            ("TTFT single image (s)", lambda r: r["ttft"]["image_single_median_s"])]
    names = list(engines)
    print(f"{'':36}" + "".join(f"{n:>14}" for n in names))
    for label, get in rows:
        cells = []
        for n in names:
            try:
                cells.append(f"{get(engines[n]):>14}")
            except (KeyError, TypeError):
                cells.append(f"{'error':>14}")
        print(f"{label:36}" + "".join(cells))


if __name__ == "__main__":
    main()
