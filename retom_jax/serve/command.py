"""``retom-jax serve``: load and compile a pipeline once, then serve it over HTTP."""
from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["add_serve_arguments", "serve"]


def _buckets(text):
    try:
        values = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        values = ()
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,2,4,8, got {text!r}")
    return values


def add_serve_arguments(s, types) -> None:
    """The options of ``retom-jax serve``; ``types``: the CLI's argparse types (window,
    positive int, dtype, mesh, lora spec) by name."""
    s.add_argument("--model", required=True, help="pipeline folder, cached repo id, or 'demo'")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 exposes the server to the network: "
                        "set a --token)")
    s.add_argument("--port", type=types["positive_int"], default=7860, help="TCP port")
    s.add_argument("--token", default=None,
                   help="bearer token every API call must carry (default: the environment "
                        "variable RETOM_JAX_SERVE_TOKEN; unset: no token)")
    s.add_argument("--steps", type=types["positive_int"], default=20,
                   help="denoising steps of a request that names none")
    s.add_argument("--scheduler", default=None, help="the model's default scheduler instead "
                                                    "of its own (ddim, euler, dpm++2m, ...)")
    s.add_argument("--dtype", type=types["dtype"], default="float32", help="compute dtype")
    s.add_argument("--merge", choices=("none", "tome", "retom", "todo"), default="none",
                   help="token merging of requests that name none (every A1111 request)")
    s.add_argument("--ratio", type=float, default=None, help="tome, retom: share merged (0.5)")
    s.add_argument("--window", type=types["window"], default=None,
                   help="retom: window of one representative; tome: cell (2x2)")
    s.add_argument("--matching", choices=("local", "global"), default=None,
                   help="retom: local or global matching (local)")
    s.add_argument("--cache-step", type=types["non_negative_int"], default=None,
                   help="retom: reuse the representatives chosen at this step")
    s.add_argument("--max-downsample", type=types["positive_int"], default=None,
                   help="merge at UNet levels downsampled at most this much (default: the "
                        "first attention level)")
    s.add_argument("--todo-factor", type=types["positive_int"], default=None,
                   help="todo: pooling factor (2)")
    s.add_argument("--lora", type=types["lora"], action="append", default=[],
                   metavar="FILE[:SCALE]",
                   help="fuse a LoRA file at start (repeatable); a request's lora_scale "
                        "multiplies the scales")
    s.add_argument("--mesh", type=types["mesh"], default=None, metavar="AXIS=N,...",
                   help="run on a device mesh, e.g. data=4")
    s.add_argument("--max-batch", type=types["positive_int"], default=8,
                   help="images gathered into one call at most")
    s.add_argument("--max-wait", type=float, default=0.05,
                   help="seconds a request waits for others to share its call")
    s.add_argument("--buckets", type=_buckets, default=(1, 2, 4, 8),
                   help="batch sizes compiled, a call padded to the next (one bucket, e.g. "
                        "8: every image from one program, bit for bit reproducible)")
    s.add_argument("--max-side", type=types["positive_int"], default=1024,
                   help="largest width / height a request may ask for")
    s.add_argument("--max-steps", type=types["positive_int"], default=150,
                   help="most steps a request may ask for")
    s.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="compile on the first request instead of before serving")
    s.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")


def serve(args, parser) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        parser.error("retom-jax serve needs fastapi and uvicorn: pip install 'retom-jax[serve]'")
    from ..merge import ReToM, ToDo, ToMe
    from ..weights import CheckpointError
    from .app import create_app
    from .run import serve_forever
    from .schemas import Limits, MergeOptions, RequestError, merge_from_options

    if args.max_wait < 0:
        parser.error(f"--max-wait must be >= 0, got {args.max_wait}")
    t0 = time.perf_counter()
    try:
        mesh = None
        if args.mesh is not None:
            from ..sharding import make_mesh

            mesh = make_mesh(**{"data": -1, **args.mesh})
        from ..pipeline import load_pipeline

        pipe = load_pipeline(args.model, args.dtype, scheduler=args.scheduler, mesh=mesh)
    except (CheckpointError, ValueError) as e:
        parser.error(f"--model {args.model}: {e}")
    first = min(pipe.unet.config.attention_downsamples(), default=1)
    try:
        merge = merge_from_options(MergeOptions(
            method=args.merge, ratio=args.ratio, window=args.window, matching=args.matching,
            cache_step=args.cache_step, max_downsample=args.max_downsample,
            todo_factor=args.todo_factor), first)
    except RequestError as e:
        parser.error(str(e).replace("merge.", "--").replace("_", "-"))
    print(f"loaded {type(pipe).__name__} in {time.perf_counter() - t0:.2f} s", flush=True)
    try:
        t1 = time.perf_counter()
        app = create_app(pipe, token=args.token, max_batch=args.max_batch,
                         max_wait=args.max_wait, buckets=args.buckets,
                         limits=Limits(max_side=args.max_side, max_steps=args.max_steps,
                                       max_images=args.max_batch),
                         default_steps=args.steps, merge=merge,
                         loras=[tuple(x) for x in args.lora], model_name=args.model,
                         warmup=args.warmup)
    except ValueError as e:
        parser.error(str(e))
    if args.warmup:
        print(f"compiled batches {list(app.state.engine.buckets)} in "
              f"{time.perf_counter() - t1:.2f} s", flush=True)
    auth = "bearer token required" if app.state.token else "no token"
    print(f"serving on http://{args.host}:{args.port} ({auth}); the page at /, the API "
          f"at /docs", flush=True)
    serve_forever(app, args.host, args.port, args.log_level)
    return 0
