"""`xgenmm caption DIR --out captions.jsonl`: caption every image in a folder through the continuous batch.

One JSON line per image (`{"file": <path relative to DIR>, "caption": ..., "num_tokens": ..., "finish_reason": ...}`),
appended as soon as each caption is ready, so an interrupted run loses nothing. A rerun skips the files already in
the output (whatever prompt produced them: use another --out for another prompt). Files that cannot be read are
reported on stderr and in the summary, and the run goes on; they are not written, so a later run retries them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..chat.request import CAPTION_MAX_TOKENS
from ..errors import EngineDeadError, ImageError, XGenMMError
from .common import CLIError, add_engine_args, add_model_args, engine_options, eprint, local_image_policy, resolve_model

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_PROMPT = "Describe this image in one sentence."


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("caption", help="caption every image of a folder into a JSONL file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="DIR", help="folder of images")
    p.add_argument("--out", "-o", required=True, help="output JSONL file (appended to; existing entries are skipped)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help=f"instruction sent with each image (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--recursive", "-r", action="store_true", help="include sub-folders")
    p.add_argument("--max-tokens", type=int, default=CAPTION_MAX_TOKENS,
                   help=f"most tokens per caption (default {CAPTION_MAX_TOKENS}: captions are embedded, keep them short)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--concurrency", type=int, default=32,
                   help="images in flight at once (the engine batches them; decoding overlaps generation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(run=run)
    return p


def find_images(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def captioned_files(out: Path) -> set[str]:
    """Files already captioned in `out` (lines that do not parse, e.g. cut off by a crash, are ignored)."""
    done: set[str] = set()
    if not out.is_file():
        return done
    with out.open(encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("file"), str) and "caption" in entry:
                done.add(entry["file"])
    return done


def _open_for_append(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = out.is_file() and out.stat().st_size > 0 and not out.read_bytes().endswith(b"\n")
    f = out.open("a", encoding="utf-8")
    if needs_newline:  # a previous run was killed mid-line: start on a fresh line
        f.write("\n")
    return f


@dataclass
class CaptionReport:
    captioned: int = 0
    skipped: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    generated_tokens: int = 0
    seconds: float = 0.0


async def caption_folder(llm, folder: Path, out: Path, prompt: str, params, *, recursive: bool = False,
                         concurrency: int = 32, progress: bool = True) -> CaptionReport:
    """Caption the images of `folder` not yet in `out`, `concurrency` at a time; returns what happened."""
    from tqdm.auto import tqdm

    report = CaptionReport()
    files = find_images(folder, recursive)
    done = captioned_files(out)
    todo = [p for p in files if p.relative_to(folder).as_posix() not in done]
    report.skipped = len(files) - len(todo)
    if report.skipped:
        eprint(f"{report.skipped} image(s) already captioned in {out}: skipped")
    policy = local_image_policy(roots=[folder])
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for p in todo:
        queue.put_nowait(p)
    bar = tqdm(total=len(todo), unit="img", desc="captioning", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()

    with _open_for_append(out) as sink:
        async def caption_one(path: Path) -> None:
            rel = path.relative_to(folder).as_posix()
            messages = [{"role": "user", "content": [{"type": "image", "image": str(path.resolve())},
                                                     {"type": "text", "text": prompt}]}]
            final = None
            try:
                async for final in llm.chat(messages, params, image_policy=policy):
                    pass
            except ImageError as exc:
                report.unreadable.append((rel, str(exc)))
                bar.write(f"unreadable, skipped: {rel}: {exc}")
                return
            except EngineDeadError:
                raise
            except XGenMMError as exc:
                report.failed.append((rel, str(exc)))
                bar.write(f"failed: {rel}: {exc}")
                return
            o = final.outputs[0]
            sink.write(json.dumps({"file": rel, "caption": o.text.strip(), "num_tokens": len(o.token_ids),
                                   "finish_reason": o.finish_reason}, ensure_ascii=False) + "\n")
            sink.flush()
            report.captioned += 1
            report.generated_tokens += len(o.token_ids)

        async def worker() -> None:
            while True:
                try:
                    path = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await caption_one(path)
                bar.update(1)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(tok_s=f"{report.generated_tokens / elapsed:.1f}", refresh=False)

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(todo))))))
        finally:
            bar.close()
    report.seconds = time.perf_counter() - start
    return report


def run(args: argparse.Namespace) -> int:
    from .. import AsyncLLM, RequestOutputKind, SamplingParams

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise CLIError(f"not a folder: {args.folder}")
    if args.concurrency < 1:
        raise CLIError("--concurrency must be at least 1")
    resolve_model(args.model)
    llm = AsyncLLM(args.model, device=args.device, dtype=args.dtype, **engine_options(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    out = Path(args.out).expanduser()
    report = asyncio.run(caption_folder(llm, folder.resolve(), out, args.prompt, params, recursive=args.recursive,
                                        concurrency=args.concurrency, progress=not args.no_progress))
    rate = report.captioned / report.seconds if report.seconds else 0.0
    tok_rate = report.generated_tokens / report.seconds if report.seconds else 0.0
    eprint(f"captioned {report.captioned} image(s) in {report.seconds:.1f}s ({rate:.2f} images/s, {tok_rate:.1f} "
           f"tokens/s) -> {out}; {report.skipped} already done, {len(report.unreadable)} unreadable"
           + (f", {len(report.failed)} failed" if report.failed else ""))
    for rel, reason in report.unreadable + report.failed:
        eprint(f"  not captioned: {rel} ({reason})")
    return 0
