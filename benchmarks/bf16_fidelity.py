"""bf16 fidelity gate: our bf16 pipeline against our float32, beside transformers' bf16 against its float32.

Teacher-forced on float32 greedy continuations (`xgenmm.testing.fidelity`): top-1 agreement, max and mean |logit
error| at every continuation position. Two corpora: the upstream golden fixtures (tiny random checkpoint, upstream's
own greedy tokens) and a corpus on a random `small` checkpoint (image prompts of several aspect ratios and text
prompts, continued by our float32 engine's greedy tokens). The gate: ours is no worse than transformers' on the same
weights (random weights give small logit margins, so only like-with-like comparisons mean anything).

    .venv/bin/python benchmarks/bf16_fidelity.py          # writes benchmarks/results/bf16_fidelity.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def corpus_samples(checkpoint: Path, num_image: int, num_text: int, max_tokens: int):
    """Prompts on a random checkpoint, continued by our float32 engine's greedy tokens."""
    from throughput import SIZES, SYSTEM, make_image

    from xgenmm import LLM, SamplingParams
    from xgenmm.client import open_engine
    from xgenmm.testing.fidelity import Sample

    handle = open_engine("native", str(checkpoint), "cpu", "float32", shared=False)
    try:
        engine, llm = handle.core, LLM.from_handle(handle)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        samples = []
        for i in range(num_image + num_text):
            image = i < num_image
            text = (f"{SYSTEM}<|user|>\n" + ("<image>\n" if image else "") + f"Question {i}: tell me about "
                    f"{'this picture' if image else 'the weather in a city number ' + str(i)}.<|end|>\n<|assistant|>\n")
            prompt = {"prompt": text, "multi_modal_data": {"image": make_image(i, SIZES[i % len(SIZES)])}} if image else text
            prepared = handle.prepare(prompt, params, f"fidelity-{i}")
            out = llm.generate(prompt, params)[0].outputs[0].token_ids
            samples.append(Sample(prepared.prompt_token_ids, prepared.images, out))
        return samples
    finally:
        handle.shutdown()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=str(ROOT / "tests" / "fixtures" / "xgenmm-tiny"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--image-prompts", type=int, default=8)
    ap.add_argument("--text-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bf16_fidelity.json"))
    args = ap.parse_args(argv)

    from xgenmm.cpu_features import cpu_computes_bf16
    from xgenmm.model.cpu_linear import bf16_kernel_available
    from xgenmm.testing import make_random_checkpoint
    from xgenmm.testing.fidelity import fixture_samples, gate_passes, measure

    t0 = time.perf_counter()
    report: dict = {"benchmark": "bf16_fidelity", "torch": torch.__version__,
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "cpu_computes_bf16": cpu_computes_bf16(),
                                "bf16_kernels": bf16_kernel_available("cpu", torch.bfloat16)},
                    "corpora": {}}
    corpora = {"upstream_fixtures": (Path(args.fixtures) / "checkpoint", fixture_samples(args.fixtures))}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_random_checkpoint(Path(tmp) / args.preset, preset=args.preset, seed=0)
        corpora[f"{args.preset}_corpus"] = (ckpt, corpus_samples(ckpt, args.image_prompts, args.text_prompts,
                                                                 args.max_tokens))
        for name, (checkpoint, samples) in corpora.items():
            result = measure(checkpoint, samples)
            report["corpora"][name] = {"samples": len(samples), **{k: v.to_dict() for k, v in result.items()},
                                       "gate_passes": gate_passes(result)}
            print(f"{name}: {len(samples)} samples, {result['ours'].positions} positions", flush=True)
            for who, r in result.items():
                print(f"  {who:13} top-1 {r.top1_agreement:.4f}  max |err| {r.max_logit_error:.4f}  "
                      f"mean |err| {r.mean_logit_error:.5f}")
            print(f"  gate (ours no worse than transformers): {'pass' if gate_passes(result) else 'FAIL'}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["loadavg"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
