"""The `xgenmm` command line; `xgenmm.cli.main.main(argv)` is the console-script entry point."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
