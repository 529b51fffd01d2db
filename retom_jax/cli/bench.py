"""``retom-jax bench``: the checkout's benchmark scripts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import HelpFormatter


BENCH_SCRIPTS = {"unet": "unet_speed", "merge": "merge_overhead", "pipeline": "pipeline_speed",
                 "torch": "torch_unet_speed", "report": "report", "plot": "plot",
                 "scaling": "scaling"}


# subcommands whose code ships in the package (no checkout needed)
LIBRARY_BENCHES = {"tpu": "retom_jax.analysis.tpu"}


def bench(args, parser) -> int:
    """Run ``benchmarks/<script>.py``'s ``main`` (or a packaged bench's) with the remaining
    arguments."""
    import importlib

    if args.script in LIBRARY_BENCHES:
        return importlib.import_module(LIBRARY_BENCHES[args.script]).main(args.args)
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (folder / "common.py").is_file():
        parser.error(f"no benchmarks/ folder beside the package ({folder}): the benchmarks ship "
                     "with the source checkout; install it with 'pip install -e .' from a clone")
    sys.path.insert(0, str(folder))
    argv0, sys.argv[0] = sys.argv[0], f"retom-jax bench {args.script}"  # the script's usage line
    try:
        return importlib.import_module(BENCH_SCRIPTS[args.script]).main(args.args)
    finally:
        sys.argv[0] = argv0


def add_parser(sub):
    """Register ``retom-jax bench``."""
    b = sub.add_parser(
        "bench", help="run a benchmark script from the checkout's benchmarks/ folder",
        formatter_class=HelpFormatter,
        description="Run one of the scripts in benchmarks/ (see benchmarks/README.md); "
                    "everything after the script name is passed to it, e.g. "
                    "'retom-jax bench unet --preset tiny --out unet.json'.")
    b.add_argument("script", choices=sorted(set(BENCH_SCRIPTS) | set(LIBRARY_BENCHES)),
                   help="; ".join([f"{k}: benchmarks/{v}.py" for k, v in sorted(BENCH_SCRIPTS.items())]
                                  + ["tpu: compile for TPU slices on this host (libtpu), "
                                     "memory per chip and estimated times"]))
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    b.set_defaults(handler=bench, subparser=b)
    return b
