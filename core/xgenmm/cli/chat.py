"""`xgenmm chat`: ask about images from the terminal, the answer streamed as it is generated.

With a question it answers once and exits; without one it is a REPL that keeps the conversation (commands:
`/image PATH`, `/reset`, `/exit`). Greedy decoding with up to 768 new tokens by default, as the official demos.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..chat.request import DEFAULT_MAX_TOKENS
from .common import (
    CLIError,
    add_engine_args,
    add_model_args,
    check_image_files,
    engine_options,
    eprint,
    local_image_policy,
    resolve_model,
)

REPL_HELP = "commands: /image PATH (attach to your next message), /reset (forget the conversation), /exit"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="ask a question about images (streams the answer; REPL without a question)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", help="the question; omit it for an interactive session")
    p.add_argument("--image", "-i", action="append", default=[], metavar="PATH",
                   help="an image file (repeat for several; they come before the question, in order)")
    p.add_argument("--system", default=None, help="system message (default: the model's SFT system message)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"most tokens per reply (default {DEFAULT_MAX_TOKENS}, as ChatXGenMM and XGenMM)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="print time to first token and speed to stderr")
    add_model_args(p)
    add_engine_args(p)
    p.set_defaults(run=run)
    return p


def user_message(text: str, images: list[Path]) -> dict:
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image", "image": str(path.resolve())} for path in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


class ChatSession:
    """A conversation with the shared engine; `ask` streams the reply to `out` and keeps it in the history."""

    def __init__(self, llm, params, system: str | None = None, out=None, show_stats: bool = False):
        self.llm = llm
        self.params = params
        self.system = system
        self.out = out or sys.stdout
        self.show_stats = show_stats
        self.messages: list[dict] = []
        self.image_paths: list[Path] = []

    def reset(self) -> None:
        self.messages = []
        self.image_paths = []

    def ask(self, text: str, images: list[Path] | None = None) -> str:
        images = images or []
        self.image_paths += images
        pending = [*([{"role": "system", "content": self.system}] if self.system and not self.messages else []),
                   user_message(text, images)]
        conversation = self.messages + pending
        policy = local_image_policy(self.image_paths)
        start = time.perf_counter()
        first = None
        pieces: list[str] = []
        final = None
        stream = self.llm.chat_stream(conversation, self.params, image_policy=policy)
        try:
            for out in stream:
                delta = out.outputs[0].text
                if delta:
                    if first is None:
                        first = time.perf_counter() - start
                    pieces.append(delta)
                    self.out.write(delta)
                    self.out.flush()
                final = out
        finally:
            stream.close()  # aborts the request when interrupted (Ctrl-C)
            self.out.write("\n")
            self.out.flush()
        reply = "".join(pieces)
        self.messages = conversation + [{"role": "assistant", "content": reply}]
        if self.show_stats and final is not None:
            elapsed = time.perf_counter() - start
            n = final.metrics.num_generated_tokens if final.metrics else len(pieces)
            eprint(f"[{n} tokens in {elapsed:.2f}s, first token after {first or elapsed:.2f}s, "
                   f"{n / elapsed:.1f} tokens/s, finish: {final.outputs[0].finish_reason}]")
        return reply


def _read_line(prompt: str) -> str | None:
    if sys.stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def repl(session: ChatSession, images: list[Path]) -> int:
    eprint(f"xgenmm chat ({REPL_HELP}; Ctrl-D quits)")
    attach = list(images)
    while True:
        line = _read_line("> ")
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            attach = []
            eprint("(conversation cleared)")
            continue
        if text.startswith("/image"):
            try:
                attach += check_image_files([text[len("/image"):].strip()])
                eprint(f"(attached {attach[-1]}; it goes with your next message)")
            except CLIError as exc:
                eprint(f"error: {exc}")
            continue
        if text.startswith("/"):
            eprint(REPL_HELP)
            continue
        try:
            session.ask(text, attach)
        except KeyboardInterrupt:
            eprint("(interrupted)")
        attach = []


def run(args: argparse.Namespace) -> int:
    from .. import LLM, RequestOutputKind, SamplingParams

    images = check_image_files(args.image)
    resolve_model(args.model)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, **engine_options(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, output_kind=RequestOutputKind.DELTA)
    session = ChatSession(llm, params, system=args.system, show_stats=args.stats)
    if args.question is not None:
        session.ask(args.question, images)
        return 0
    return repl(session, images)
