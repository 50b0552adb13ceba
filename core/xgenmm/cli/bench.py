"""`xgenmm bench [--model ...] [benchmark options]`: run the repository's throughput benchmark
(`benchmarks/throughput.py`). Options this command does not know are passed on to the benchmark unchanged.

`xgenmm bench --fidelity --quantization int8 --model PATH`: how far the quantized model's next-token distributions are
from the unquantized one's (greedy agreement, mean / max KL) on a fixed prompt set, text and images
(`xgenmm.testing.quant_fidelity`; ships with the package, no checkout needed); `--peer` adds transformers + torchao
int8 weight-only measured the same way (needs torchao)."""

from __future__ import annotations

import argparse
import inspect
import runpy
import sys
from pathlib import Path

from .common import CLIError

BENCHMARK_RELATIVE_PATH = Path("benchmarks") / "throughput.py"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="run the throughput benchmark (extra options go to the benchmark)",
                              description=__doc__)
    p.add_argument("--model", "-m", default=None, help="model id or folder (default: the benchmark's)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantization", default=None, help="int8 | int4 | fp8 (comma-separated with --fidelity)")
    p.add_argument("--fidelity", action="store_true",
                   help="measure the quantized model against the unquantized one instead of the throughput")
    p.add_argument("--script", default=None, help=f"benchmark script (default: the repo's {BENCHMARK_RELATIVE_PATH})")
    p.set_defaults(run=run, passthrough=True)
    return p


def find_benchmark(script: str | None = None) -> Path:
    candidates = [Path(script)] if script else [
        Path(__file__).resolve().parents[3] / BENCHMARK_RELATIVE_PATH,  # source checkout: core/xgenmm/cli/ -> root
        Path.cwd() / BENCHMARK_RELATIVE_PATH,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise CLIError(f"the throughput benchmark is not here (looked for {', '.join(map(str, candidates))}); it ships "
                   "with the source repository: run from a checkout, or pass --script PATH")


def benchmark_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    argv = []
    for name in ("model", "device", "dtype", "quantization"):
        value = getattr(args, name, None)
        if value is not None:
            argv += [f"--{name}", value]
    return argv + list(extra)


def run_fidelity(args: argparse.Namespace, extra: list[str]) -> int:
    from ..errors import XGenMMError
    from ..testing.quant_fidelity import main as fidelity_main
    from .common import default_model

    argv = ["--model", args.model or default_model(), "--quantization", args.quantization or "int8"]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.device:
        argv += ["--device", args.device]
    try:
        fidelity_main(argv + list(extra))
    except XGenMMError as exc:
        raise CLIError(str(exc)) from None
    return 0


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    if args.fidelity:
        return run_fidelity(args, extra or [])
    path = find_benchmark(args.script)
    argv = benchmark_argv(args, extra or [])
    namespace = runpy.run_path(str(path), run_name="xgenmm_bench")  # defines main() without running it
    main = namespace.get("main")
    saved = sys.argv
    sys.argv = [str(path), *argv]  # for a main() that reads sys.argv itself
    try:
        if callable(main):
            result = main(argv) if inspect.signature(main).parameters else main()
        else:
            runpy.run_path(str(path), run_name="__main__")
            result = 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return result if isinstance(result, int) and not isinstance(result, bool) else 0  # main may return a report
