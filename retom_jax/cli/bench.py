"""``retom-jax bench``: the checkout's benchmark scripts, and ``bench cost`` (XLA's counts
of a whole call, from the library: :mod:`retom_jax.analysis.cost`).
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

    if args.script == "cost":
        try:
            return cost_main(args.args)
        except ValueError as e:
            parser.error(f"bench cost: {e}")
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
    b.add_argument("script", choices=sorted(set(BENCH_SCRIPTS) | set(LIBRARY_BENCHES) | {"cost"}),
                   help="; ".join([f"{k}: benchmarks/{v}.py" for k, v in sorted(BENCH_SCRIPTS.items())]
                                  + ["tpu: compile for TPU slices on this host (libtpu), "
                                     "memory per chip and estimated times",
                                     "cost: XLA's FLOPs and bytes of a whole call per image "
                                     "(compiled on the CPU, never run)"]))
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    b.set_defaults(handler=bench, subparser=b)
    return b


# ----------------------------------------------------------------------------- bench cost

def _size_arg(text):
    h, _, w = text.lower().partition("x")
    try:
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW pixels, got {text!r}") from None


def cost_parser() -> argparse.ArgumentParser:
    from ..analysis.cost import ARCHITECTURES

    p = argparse.ArgumentParser(
        prog="retom-jax bench cost", formatter_class=HelpFormatter,
        description="XLA's own counts (FLOPs, bytes accessed) of a whole sampling call per "
                    "image (text encoding, every denoising step, VAE decode), for a model "
                    "architecture with abstract weights, compiled on the CPU and never run. "
                    "Each step program is counted as often as the loop runs it (XLA counts a "
                    "loop body once). Every combination of the options is a row.")
    p.add_argument("--model", nargs="+", choices=list(ARCHITECTURES), default=["sd15"])
    p.add_argument("--size", type=_size_arg, nargs="+", default=None, metavar="N|HxW",
                   help="image pixels (default: the architecture's own: sd15 512, sd2 768, "
                        "sdxl 1024, demo 64)")
    p.add_argument("--steps", type=int, nargs="+", default=[30])
    p.add_argument("--method", nargs="+", default=["none"],
                   choices=["none", "tome", "retom", "todo"])
    p.add_argument("--ratio", type=float, nargs="+", default=[0.5],
                   help="tome, retom: share of tokens merged (todo: --todo-factor)")
    p.add_argument("--todo-factor", type=int, default=2)
    p.add_argument("--step-cache", type=int, nargs="+", default=[1], metavar="N",
                   help="step cache intervals (1: no caching)")
    p.add_argument("--step-cache-depth", type=int, default=1)
    p.add_argument("--fast", action="store_true", help="add a row with the --fast preset")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--no-guidance", action="store_true", help="count without guidance")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--scheduler", default=None, help="default: the architecture's own")
    p.add_argument("--out", default=None, help="JSON file {meta, rows}")
    return p


def cost_main(argv) -> int:
    import datetime
    import json
    import shlex

    import jax

    from .. import merge as merging
    from ..analysis import cost
    from ..pipelines.step_cache import FAST, StepCache
    from ..models.weights import parse_dtype
    from ..analysis.cost import DEFAULT_SIZE

    a = cost_parser().parse_args(argv)
    rows = []
    for arch in a.model:
        pipe = cost.abstract_pipeline(arch, parse_dtype(a.dtype), a.scheduler)
        first = min(pipe.unet.config.attention_downsamples() or (1,))
        settings = [(m, r if m != "none" else 0.0, n) for m in a.method
                    for r in (a.ratio if m in ("tome", "retom") else [0.0]) for n in a.step_cache]
        if a.fast:
            settings.append(("fast", FAST.ratio, FAST.interval))
        settings.insert(0, ("none", 0.0, 1))  # the baseline of every ratio
        for size in a.size or [(DEFAULT_SIZE[arch],) * 2]:
            for steps in a.steps:
                base = None
                for method, ratio, interval in dict.fromkeys(settings):
                    if method == "fast":
                        merge, cache = FAST.merge(first), FAST.step_cache
                    else:
                        merge = merging.from_options(method, ratio=ratio or 0.5,
                                                     max_downsample=first,
                                                     todo_factor=a.todo_factor)
                        cache = StepCache(interval, a.step_cache_depth) if interval > 1 else None
                    programs = cost.pipeline_cost(
                        pipe, height=size[0], width=size[1], steps=steps, batch=a.batch,
                        guidance=not a.no_guidance, merge=merge, step_cache=cache)
                    flop, data = cost.per_image(programs, a.batch)
                    base = base or flop
                    row = dict(model=arch, height=size[0], width=size[1], steps=steps,
                               method=method, ratio=ratio,
                               step_cache=[cache.interval, cache.depth] if cache else None,
                               gflop_per_image=flop, gbytes_per_image=data,
                               flop_vs_base=flop / base,
                               programs=[vars(r) for r in programs])
                    rows.append(row)
                    print(cost.cost_table([row]).splitlines()[-1] if len(rows) > 1 else
                          cost.cost_table([row]), flush=True)
    meta = {"command": shlex.join(["retom-jax", "bench", "cost", *argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "compiled_for": "cpu", "guidance": not a.no_guidance,
            "batch": a.batch, "dtype": a.dtype}
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0
