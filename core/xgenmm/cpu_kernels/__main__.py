"""`python -m xgenmm.cpu_kernels build`: compile the CPU kernels now (CI setup, images), print where they are."""

from __future__ import annotations

import logging
import sys

from . import build


def main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m xgenmm.cpu_kernels build", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    if build.load():
        print(f"xgenmm CPU kernels ready in {build.cache_dir() / build.build_key()}")
    else:
        print(f"xgenmm CPU kernels not used: {build.unavailable_reason()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
