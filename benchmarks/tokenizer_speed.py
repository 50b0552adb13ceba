"""Prompt tokenization speed: our upstream-exact `XGenMMTokenizer` beside transformers' own fast tokenizer on the same
files (not upstream-exact) and, where transformers 4.x with sentencepiece is installed, the slow tokenizer the
official demos use (the reference for the ids). Side by side in one run, same prompts.

    .venv/bin/python benchmarks/tokenizer_speed.py [--tokenizer DIR] [--out benchmarks/results/tokenizer-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import transformers

from xgenmm.chat.template import DEFAULT_SYSTEM_MESSAGE
from xgenmm.tokenizer import load_tokenizer

HERE = Path(__file__).resolve().parent
DEFAULT_TOKENIZER = HERE.parent / "tests" / "fixtures" / "tokenizer" / "phi3-spm"
SYSTEM = f"<|system|>\n{DEFAULT_SYSTEM_MESSAGE}<|end|>\n"
PARAGRAPH = ("The chart compares the number of visitors to the museum in each month of the year. The highest value "
             "is reached in July, with about four thousand visitors, and the lowest value is in February. ")

WORKLOADS = {
    "chat_short": SYSTEM + "<|user|>\n<image>\nWhat is in this image?<|end|>\n<|assistant|>\n",
    "chat_multi_turn": SYSTEM + "".join(
        f"<|user|>\n<image>\nQuestion {i}: what changed?<|end|>\n<|assistant|>\nThe {i}th answer is here.<|end|>\n"
        for i in range(8)) + "<|assistant|>\n",
    "rag_long": SYSTEM + "<|user|>\nContext:\n" + PARAGRAPH * 60 + "\nQuestion: which month is lowest?<|end|>\n"
                         "<|assistant|>\n",
}


def _time(fn, repeat: int) -> float:
    """Median seconds per call over `repeat` calls (after one warm-up)."""
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    ours = load_tokenizer(args.tokenizer)
    stock = transformers.AutoTokenizer.from_pretrained(str(args.tokenizer), use_fast=True)
    stock.add_special_tokens({"additional_special_tokens": ["<image>", "<image placeholder>", "<|endofchunk|>"]})
    contenders = {"xgenmm (upstream-exact)": ours, f"transformers {transformers.__version__} fast": stock}
    try:  # the reference: only with transformers 4.x + sentencepiece
        slow = transformers.AutoTokenizer.from_pretrained(str(args.tokenizer), use_fast=False, legacy=False)
        if type(slow).__name__ == "LlamaTokenizer" and not getattr(slow, "is_fast", True):
            slow.add_special_tokens({"additional_special_tokens": ["<image>", "<image placeholder>", "<|endofchunk|>"]})
            slow.eos_token = "<|end|>"
            contenders[f"transformers {transformers.__version__} slow (upstream)"] = slow
    except Exception:  # noqa: BLE001 - no slow tokenizer in this environment
        pass

    results = {}
    for name, text in WORKLOADS.items():
        n_tokens = len(ours(text).input_ids)
        row = {"tokens": n_tokens}
        for label, tok in contenders.items():
            single = _time(lambda: tok(text), args.repeat)
            batch = _time(lambda: tok([text] * args.batch), max(5, args.repeat // 20))
            row[label] = {"single_us": round(single * 1e6, 1), "batch_us_per_prompt": round(batch / args.batch * 1e6, 1)}
        base = row[f"transformers {transformers.__version__} fast"]
        mine = row["xgenmm (upstream-exact)"]
        row["ratio_single_vs_stock_fast"] = round(mine["single_us"] / base["single_us"], 2)
        row["ratio_batch_vs_stock_fast"] = round(mine["batch_us_per_prompt"] / base["batch_us_per_prompt"], 2)
        results[name] = row
        print(name, json.dumps(row))
    report = {
        "what": "prompt tokenization time, median of repeated calls; ratio = ours / transformers' fast (lower is faster)",
        "tokenizer": str(args.tokenizer.relative_to(HERE.parent) if args.tokenizer.is_relative_to(HERE.parent) else args.tokenizer),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "transformers": transformers.__version__,
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
