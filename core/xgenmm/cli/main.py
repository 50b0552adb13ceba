"""`xgenmm`: the command line (`chat`, `caption`, `serve`, `download`, `bench`, `make-random-checkpoint`)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import XGenMMError
from . import bench, caption, chat, download, make_random_checkpoint, serve

COMMANDS = (chat, caption, serve, download, bench, make_random_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="xgenmm", description="Fast, faithful inference for Salesforce xGen-MM (BLIP-3) v1.5.",
        epilog="Example:  xgenmm chat --image examples/images/house.png \"What is in this image?\"")
    parser.add_argument("--version", action="version", version=f"xgenmm {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log engine messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def error_line(command: str, exc: BaseException) -> str:
    """`xgenmm <command>: error: <message>` on one line (a message's own line breaks become spaces)."""
    return f"xgenmm {command}: error: {' '.join(str(exc).split())}"


def check_placement(args: argparse.Namespace) -> None:
    """`--device` / `--dtype` checked before anything loads (a typo fails in a second, not after the tokenizer)."""
    if hasattr(args, "device") or hasattr(args, "dtype"):
        from ..placement import resolve_placement

        resolve_placement(getattr(args, "device", None), getattr(args, "dtype", None))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        check_placement(args)
        if getattr(args, "passthrough", False):
            return args.run(args, extra)
        return args.run(args)
    except XGenMMError as exc:  # CLIError too: a mistake the user can fix, said in one line with its remedy
        print(error_line(args.command, exc), file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
