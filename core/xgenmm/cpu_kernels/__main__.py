"""`python -m xgenmm.cpu_kernels build`: compile the CPU kernels this CPU runs now (CI setup, images): the AVX-512 BF16
library and the AVX2 int8 library, each where the CPU has its instructions; print where they are or why not."""

from __future__ import annotations

import logging
import sys

from . import build


def main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m xgenmm.cpu_kernels build", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO)
    for library in build.LIBRARIES:
        if build.load(library):
            print(f"{library.title} ready in {build.cache_dir() / build.build_key(library)}")
        else:
            print(f"{library.title} not used: {build.unavailable_reason(library)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
