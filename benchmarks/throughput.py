"""Throughput of the paged engine vs what users run today: transformers `generate(inputs_embeds=...)`.

Both sides run the same weights (a random checkpoint in the official format), in the same dtype (`--dtype auto`:
bf16 where the CPU computes it natively, else float32), the same vision encoder and the same requests: N questions
about images of several aspect ratios behind a shared system prompt, greedy, a fixed number of new tokens. The
baseline runs one request at a time (as the official demo does) and as left-padded batches, on ATen linears and
transformers' SDPA attention as upstream; the engine gets every request at once (continuous batching) with its own
kernels. Greedy tokens are compared before timing is trusted. Times to first token run from the caller's call
(preparation included) on both sides. A second measurement shows the prefix + vision cache: the same image and
prompt asked again (timed around the whole call, so image preparation is included).

The default preset is `scaled` (the real widths at a quarter of the depth: vision : prefill : decode costs in the
real model's proportions, see `xgenmm/testing/presets.py`); `small` has a full-width perceiver beside a 384-wide LM.

    .venv/bin/python benchmarks/throughput.py                 # scaled preset, 16 requests x 128 tokens, bf16 if native
    .venv/bin/python benchmarks/throughput.py --quick         # a fast smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(640, 480), (300, 900), (1200, 350), (2000, 1000), (350, 640), (800, 800), (1024, 512), (480, 640)]
SYSTEM = ("<|system|>\nA chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions.<|end|>\n")


def make_image(i: int, size: tuple[int, int]) -> Image.Image:
    """Distinct synthetic pictures (so the vision cache cannot serve one request from another)."""
    img = Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
    draw = ImageDraw.Draw(img)
    w, h = size
    for k in range(6):
        x0, y0 = (k * 97 + i * 31) % w, (k * 61 + i * 17) % h
        draw.rectangle([x0, y0, min(w - 1, x0 + w // 4), min(h - 1, y0 + h // 5)],
                       fill=((k * 50 + i * 7) % 256, (k * 90) % 256, (i * 40) % 256))
    draw.ellipse([w // 3, h // 3, w // 2, h // 2], outline=(255, 255, 255), width=3)
    return img


def make_requests(n: int) -> list[dict]:
    return [{"prompt": f"{SYSTEM}<|user|>\n<image>\nQuestion {i}: describe the shapes and colours in this picture."
                       f"<|end|>\n<|assistant|>\n", "multi_modal_data": {"image": make_image(i, SIZES[i % len(SIZES)])}}
            for i in range(n)]


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


# ---- the engine -----------------------------------------------------------------------------------------------------
def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_engine(model_dir: str, requests: list[dict], max_tokens: int, options: dict, dtype: str) -> dict:
    from xgenmm import LLM, SamplingParams
    from xgenmm.client import open_engine

    handle = open_engine("native", model_dir, "cpu", dtype, **options, shared=False)
    llm = LLM.from_handle(handle)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate({"prompt": "<image> warm up", "multi_modal_data": {"image": make_image(999, (64, 64))}}, params.replace(max_tokens=2))
    handle.core.block_manager.reset_prefix_cache()
    handle.core.vision.cache.clear()
    reset_peak_rss()
    t_call = time.monotonic()
    wall, outs = _timed(lambda: llm.generate(requests, params))
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.first_token_time - t_call for o in outs]  # from the caller's call, preparation included
    engine = handle.core
    preemptions = handle.core.stats().num_preemptions
    result = dict(wall_s=wall, output_tokens=tokens, output_tok_s=tokens / wall, ttft_p50_s=pct(ttft, 50),
                  ttft_p99_s=pct(ttft, 99), peak_rss_mib=peak_rss_mib(), dtype=str(engine.dtype).removeprefix("torch."),
                  linear_kernel=engine.model.linear_kernel, attention_backend=engine.runner.backend.name,
                  kv_cache_mib=engine.runner.kv_cache_bytes / 2**20, preemptions=preemptions, token_ids=[o.outputs[0].token_ids for o in outs])

    # The floor no batching can go below: the same requests with one output token each (vision + prefill only,
    # caches cleared). The engine cannot beat a baseline by more than the baseline's wall time / this floor.
    handle.core.block_manager.reset_prefix_cache()
    handle.core.vision.cache.clear()
    result["vision_and_prefill_floor_s"] = _timed(lambda: llm.generate(requests, params.replace(max_tokens=1)))[0]

    # Prefix + vision cache: one image question cold, then the same again, then the same image with a new question;
    # each timed around the whole call (image loading and tiling included).
    handle.core.block_manager.reset_prefix_cache()
    handle.core.vision.cache.clear()
    img = make_image(12345, (640, 480))
    q = lambda text: {"prompt": f"{SYSTEM}<|user|>\n<image>\n{text}<|end|>\n<|assistant|>\n", "multi_modal_data": {"image": img}}
    one = params.replace(max_tokens=1)
    cold = _timed(lambda: llm.generate(q("What is in this image?"), one))[0]
    warm = _timed(lambda: llm.generate(q("What is in this image?"), one))[0]
    warm_new_question = _timed(lambda: llm.generate(q("Which colours dominate?"), one))[0]
    result.update(prefix_cold_ttft_s=cold, prefix_warm_ttft_s=warm, prefix_warm_new_question_ttft_s=warm_new_question,
                  prefix_speedup=cold / warm, prefix_new_question_speedup=cold / warm_new_question)
    handle.shutdown()
    return result


# ---- the transformers baseline --------------------------------------------------------------------------------------
class _FirstToken:
    """A `generate` streamer that records when the first new token arrives."""

    def __init__(self):
        self.time = None

    def put(self, value):
        if self.time is None and value.numel() and value.dim() == 1:  # prompt ids come as [1, L]; new tokens as [1]
            self.time = time.perf_counter()

    def end(self):
        pass


def fused_embeddings(model, tokenizer, processor, request: dict) -> torch.Tensor:
    from xgenmm.model.xgenmm import fuse_embeddings
    from xgenmm.multimodal.fusion import fuse_prompt

    ids = tokenizer(request["prompt"], add_special_tokens=False).input_ids
    image = processor(request["multi_modal_data"]["image"])
    fused = fuse_prompt(ids, [image])
    vision = model.encode_images([image])[0]
    rows = torch.arange(fused.image_spans[0].start, fused.image_spans[0].end)
    return fuse_embeddings(model, torch.tensor(fused.token_ids), rows, vision)


def run_baseline(model_dir: str, requests: list[dict], max_tokens: int, batch_sizes: list[int], dtype: str) -> dict:
    from xgenmm.checkpoint import load_model
    from xgenmm.multimodal.image_processing import ImageProcessor
    from xgenmm.reference import build_hf_language_model
    from xgenmm.tokenizer import load_tokenizer

    # ATen linears, as transformers' modules (and upstream's vision code) run them; the engine's linears (oneDNN, our
    # bf16 kernel) are its own optimisations (engine option linear_kernel, --engine-linear-kernel torch to compare).
    model = load_model(model_dir, "cpu", dtype, linear_kernel="torch")
    tokenizer = load_tokenizer(model_dir)
    processor = ImageProcessor.from_pretrained(model_dir)
    hf = build_hf_language_model(model)
    gen = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, num_beams=1, pad_token_id=32011,
               eos_token_id=None)
    with torch.inference_mode():
        hf.generate(inputs_embeds=fused_embeddings(model, tokenizer, processor, make_requests(1)[0])[None], max_new_tokens=2,
                    do_sample=False, pad_token_id=32011)
    # one request at a time, as the official demo: vision + fusion + generate per request
    reset_peak_rss()
    ttft, token_ids = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for req in requests:  # every request is submitted at t0; TTFT counts the wait for the ones before it
            timer = _FirstToken()
            emb = fused_embeddings(model, tokenizer, processor, req)
            out = hf.generate(inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
                              streamer=timer, **gen)
            ttft.append(timer.time - t0)
            token_ids.append(out[0].tolist())
    wall = time.perf_counter() - t0
    tokens = sum(len(t) for t in token_ids)
    result = dict(linear_kernel=model.linear_kernel, dtype=str(model.embed_weight.dtype).removeprefix("torch."),
                  sequential=dict(wall_s=wall, output_tokens=tokens, output_tok_s=tokens / wall, ttft_p50_s=pct(ttft, 50),
                                  ttft_p99_s=pct(ttft, 99), peak_rss_mib=peak_rss_mib()), token_ids=token_ids)
    padded = {}
    with torch.inference_mode():
        for bsz in batch_sizes:
            reset_peak_rss()
            t0 = time.perf_counter()
            tokens = 0
            for start in range(0, len(requests), bsz):
                embs = [fused_embeddings(model, tokenizer, processor, r) for r in requests[start : start + bsz]]
                longest = max(e.shape[0] for e in embs)
                batch = embs[0].new_zeros((len(embs), longest, embs[0].shape[1]))
                mask = torch.zeros(len(embs), longest, dtype=torch.long)
                for i, e in enumerate(embs):  # left padding, as the official batch demo
                    batch[i, longest - e.shape[0] :] = e
                    mask[i, longest - e.shape[0] :] = 1
                out = hf.generate(inputs_embeds=batch, attention_mask=mask, **gen)
                tokens += out.numel()
            wall = time.perf_counter() - t0
            padded[bsz] = dict(wall_s=wall, output_tokens=tokens, output_tok_s=tokens / wall, peak_rss_mib=peak_rss_mib())
    result["padded"] = padded
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a random checkpoint of --preset)")
    ap.add_argument("--preset", default="scaled", choices=["tiny", "small", "scaled"])
    ap.add_argument("--device", default="cpu", choices=["cpu"], help="this benchmark is the CPU one (GPU: gpu_check.sh)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="both sides' dtype; auto = bfloat16 where the CPU computes it natively, else float32")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="4,8,16")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0,
                    help="the engine's KV pool; the default holds all 16 requests at once, as the padded baseline does "
                         "(too small a pool measures preemption by recompute, not batching)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "throughput-cpu.json"))
    ap.add_argument("--engine-linear-kernel", default="auto", choices=["auto", "torch"],
                    help="the engine's linear layers: oneDNN on CPU (auto) or ATen like the baseline (torch)")
    ap.add_argument("--quantization", default=None, choices=["int8", "int4", "fp8"],
                    help="weight-only quantization of our engine's language model (docs/quantization.md)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, 4 requests, 8 tokens (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.num_requests, args.max_tokens, args.batch_sizes = "tiny", 4, 8, "2,4"
    torch.manual_seed(0)
    from xgenmm.placement import resolve_dtype

    dtype = str(resolve_dtype(args.dtype, None, torch.device("cpu"))).removeprefix("torch.")
    model_dir = args.model
    if model_dir is None:
        from xgenmm.testing import make_random_checkpoint

        cache = Path(os.environ.get("XGENMM_BENCH_CACHE", Path(tempfile.gettempdir()) / "xgenmm-bench"))
        model_dir = cache / f"{args.preset}-seed0"
        if not (model_dir / "config.json").exists():
            make_random_checkpoint(model_dir, preset=args.preset, seed=0,
                                   dtype="bfloat16" if args.preset == "scaled" else "float32")
        model_dir = str(model_dir)
    requests = make_requests(args.num_requests)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    load_before = os.getloadavg()
    engine = run_engine(model_dir, requests, args.max_tokens, {"linear_kernel": args.engine_linear_kernel, "quantization": args.quantization,
                                                                  "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)}, dtype)
    baseline = run_baseline(model_dir, requests, args.max_tokens, batch_sizes, dtype)
    ours_ids, theirs_ids = engine.pop("token_ids"), baseline.pop("token_ids")
    agree = sum(a == b for a, b in zip(ours_ids, theirs_ids))
    first_agree = sum(a[:1] == b[:1] for a, b in zip(ours_ids, theirs_ids))
    common = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(ours_ids, theirs_ids)]
    seq = baseline["sequential"]
    best_bsz, best = max(baseline["padded"].items(), key=lambda kv: kv[1]["output_tok_s"])
    report = dict(
        benchmark="throughput", device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        torch=torch.__version__, torch_threads=torch.get_num_threads(), loadavg_before=load_before,
        loadavg_after=os.getloadavg(), dtype=dtype, preset=args.preset,
        model=model_dir if args.model else f"random {args.preset}",
        num_requests=args.num_requests, max_tokens=args.max_tokens, greedy_token_agreement=f"{agree}/{args.num_requests}",
        # in float32 both sides give the same tokens; in bf16 their roundings differ (different kernels) and random
        # weights have small logit margins, so sequences part after a while: the bf16 fidelity of each side against
        # float32 is benchmarks/bf16_fidelity.py
        first_token_agreement=f"{first_agree}/{args.num_requests}",
        mean_common_prefix_tokens=round(statistics.mean(common), 1),
        engine=engine, baseline=baseline,
        ratios=dict(
            engine_vs_sequential_output_tok_s=engine["output_tok_s"] / seq["output_tok_s"],
            engine_vs_best_padded_output_tok_s=engine["output_tok_s"] / best["output_tok_s"],
            best_padded_batch_size=best_bsz,
            engine_vs_sequential_ttft_p50=seq["ttft_p50_s"] / engine["ttft_p50_s"],
            prefix_cache_ttft_speedup=engine["prefix_speedup"],
            # no engine can exceed this vs the sequential baseline here: its whole wall time / the engine's time
            # for vision + prefill alone (which batching does not shrink)
            sequential_vs_floor_upper_bound=seq["wall_s"] / engine["vision_and_prefill_floor_s"],
        ),
    )
    r = report["ratios"]
    print(f"\n{args.num_requests} image requests x {args.max_tokens} tokens, preset {args.preset}, {dtype}, {report['device']}")
    print(f"greedy tokens identical to transformers: {report['greedy_token_agreement']} (first token: "
          f"{report['first_token_agreement']}, mean common prefix {report['mean_common_prefix_tokens']} tokens"
          + ("; bf16 roundings differ between the two sides, see bf16_fidelity.py)" if dtype == "bfloat16" else ")"))
    print(f"{'':28}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'peak MiB':>10}")
    print(f"{'xgenmm engine':28}{engine['output_tok_s']:10.1f}{engine['ttft_p50_s']:10.2f}{engine['ttft_p99_s']:10.2f}{engine['peak_rss_mib']:10.0f}")
    print(f"{'transformers sequential':28}{seq['output_tok_s']:10.1f}{seq['ttft_p50_s']:10.2f}{seq['ttft_p99_s']:10.2f}{seq['peak_rss_mib']:10.0f}")
    for bsz, p in baseline["padded"].items():
        print(f"{'transformers padded b=' + str(bsz):28}{p['output_tok_s']:10.1f}{'':>10}{'':>10}{p['peak_rss_mib']:10.0f}")
    print(f"engine / sequential: {r['engine_vs_sequential_output_tok_s']:.2f}x   engine / best padded (b={best_bsz}): "
          f"{r['engine_vs_best_padded_output_tok_s']:.2f}x")
    print(f"vision + prefill alone (1 token each): {engine['vision_and_prefill_floor_s']:.2f} s of the engine's "
          f"{engine['wall_s']:.2f} s; so no engine can beat sequential by more than "
          f"{r['sequential_vs_floor_upper_bound']:.2f}x on this workload")
    print(f"prefix cache: cold TTFT {engine['prefix_cold_ttft_s']*1000:.0f} ms, same image+prompt "
          f"{engine['prefix_warm_ttft_s']*1000:.0f} ms ({engine['prefix_speedup']:.1f}x), same image new question "
          f"{engine['prefix_warm_new_question_ttft_s']*1000:.0f} ms ({engine['prefix_new_question_speedup']:.1f}x)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
