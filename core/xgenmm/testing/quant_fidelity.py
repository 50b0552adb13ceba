"""How far a quantized model is from the unquantized one, teacher-forced: `xgenmm bench --fidelity --quantization int8`.

For every sample (a prompt, with its images, and a continuation) both models score the whole sequence in one pass;
at every continuation position we compare their next-token distributions: greedy agreement (same argmax), the KL
divergence KL(unquantized || quantized) (mean and max over positions), and the largest logit difference.

Samples: the upstream golden fixtures (their prompts, images and upstream's greedy continuations), or a fixed prompt
set (`prompt_samples`: text-only and image chat prompts, each continued by a fixed answer) tokenized with the
checkpoint's own tokenizer. Random weights have no outlier channels, which is what makes low-bit weights hard on real
ones, so a table from random checkpoints says the code is right, not that the real model keeps its quality: users
with the real weights run this command on them. `--peer` adds the same measurement for transformers + torchao int8
weight-only against transformers unquantized (`peer_fidelity`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .fidelity import Sample, fixture_samples, ours_logits
from .next_token_fidelity import Fidelity, compare

ANSWER = ("The picture shows a few coloured rectangles and a white ring on a plain background; the largest shape is "
          "near the top left corner.")
QUESTIONS = ("Describe this picture in one sentence.", "What colours do you see?", "How many shapes are there?")
TEXT_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                "Explain in two sentences why the sky is blue.")


def synthetic_image(i: int, size: tuple[int, int] = (640, 480)):
    """Distinct synthetic pictures (rectangles and a ring), as the throughput benchmark draws them."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
    draw = ImageDraw.Draw(img)
    w, h = size
    for k in range(6):
        x0, y0 = (k * 97 + i * 31) % w, (k * 61 + i * 17) % h
        draw.rectangle([x0, y0, min(w - 1, x0 + w // 4), min(h - 1, y0 + h // 5)],
                       fill=((k * 50 + i * 7) % 256, (k * 90) % 256, (i * 40) % 256))
    draw.ellipse([w // 3, h // 3, w // 2, h // 2], outline=(255, 255, 255), width=3)
    return img


def prompt_samples(checkpoint, images: list | None = None, answer: str = ANSWER) -> list[Sample]:
    """The fixed prompt set: a chat prompt per text question and per image (synthetic ones unless `images` are
    given), each continued by `answer`, tokenized with the checkpoint's tokenizer."""
    from ..checkpoint import resolve_model_dir
    from ..multimodal.image_processing import ImageProcessor
    from ..tokenizer import load_tokenizer

    path = resolve_model_dir(checkpoint)
    tokenizer = load_tokenizer(path)
    processor = ImageProcessor.from_pretrained(path)
    images = images if images is not None else [synthetic_image(i) for i in range(len(QUESTIONS))]
    turn = "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\n{}<|end|>\n<|assistant|>\n"
    continuation = tokenizer(answer, add_special_tokens=False)["input_ids"]
    samples = [Sample(tokenizer(turn.format(q))["input_ids"], [], continuation) for q in TEXT_PROMPTS]
    for i, image in enumerate(images):
        ids = tokenizer(turn.format("<image>\n" + QUESTIONS[i % len(QUESTIONS)]))["input_ids"]
        samples.append(Sample(ids, [processor(image)], continuation))
    return samples


def measure(checkpoint, samples: list[Sample], methods: list[str], dtype: str = "bfloat16",
            device: str = "cpu") -> dict[str, Fidelity]:
    """{method: Fidelity} of each quantized model against the unquantized one in `dtype`, on the same samples."""
    from ..checkpoint import load_model

    reference = load_model(checkpoint, device, dtype)
    ref_logits = [ours_logits(reference, s) for s in samples]
    del reference
    out = {}
    for method in methods:
        model = load_model(checkpoint, device, dtype, quantization=method)
        out[method] = compare(ref_logits, [ours_logits(model, s) for s in samples])
        del model
    return out


def main(argv: list[str] | None = None) -> dict:
    from ..model.quant import QUANTIZATION_METHODS

    ap = argparse.ArgumentParser(prog="xgenmm bench --fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "-m", required=True, help="checkpoint directory or Hugging Face id")
    ap.add_argument("--quantization", default="int8",
                    help=f"comma-separated methods (of {', '.join(QUANTIZATION_METHODS)}; default int8)")
    ap.add_argument("--dtype", default="bfloat16", help="the unquantized model's dtype (default bfloat16)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image", action="append", default=None, help="image file for the image prompts (repeatable; "
                    "default: synthetic pictures)")
    ap.add_argument("--fixtures", default=None, help="use the golden fixtures folder's samples instead "
                    "(e.g. tests/fixtures/xgenmm-tiny, with --model its checkpoint + a tokenizer)")
    ap.add_argument("--peer", action="store_true", help="also measure transformers + torchao int8 weight-only "
                    "against transformers in --dtype on the same samples (needs torchao; xgenmm.testing.peer_fidelity)")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.quantization.split(",") if m.strip()]
    from ..model.quant import check_quantization

    for method in methods:
        check_quantization(method, args.device)
    if args.peer:
        from .peer_fidelity import require_torchao

        require_torchao()  # before any model is loaded
    if args.fixtures:
        samples = fixture_samples(args.fixtures)
    else:
        from PIL import Image

        samples = prompt_samples(args.model, [Image.open(p) for p in args.image] if args.image else None)
    started = time.time()
    table = measure(args.model, samples, methods, args.dtype, args.device)
    peer = None
    if args.peer:
        from .peer_fidelity import measure_peer

        peer = measure_peer(args.model, samples, args.dtype, args.device)
    report = {"model": str(args.model), "dtype": args.dtype, "device": args.device, "samples": len(samples),
              "image_samples": sum(1 for s in samples if s.images), "torch": torch.__version__,
              "seconds": round(time.time() - started, 1), "fidelity": {m: f.to_dict() for m, f in table.items()}}
    if peer is not None:
        report["peer"] = peer.to_dict()
    print(f"{'method':<8} {'positions':>9} {'greedy agreement':>16} {'mean KL':>10} {'max KL':>10} {'max |dlogit|':>12}")
    for method, f in table.items():
        print(f"{method:<8} {f.positions:>9} {f.greedy_agreement:>16.2%} {f.mean_kl:>10.2e} {f.max_kl:>10.2e} "
              f"{f.max_logit_error:>12.3f}")
    if peer is not None:
        f = peer.fidelity
        print(f"{'peer':<8} {f.positions:>9} {f.greedy_agreement:>16.2%} {f.mean_kl:>10.2e} {f.max_kl:>10.2e} "
              f"{f.max_logit_error:>12.3f}  (transformers {peer.transformers} + torchao {peer.torchao} int8 "
              f"weight-only, against transformers {args.dtype})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
