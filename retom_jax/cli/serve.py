"""``retom-jax serve --model M``: load and compile a pipeline once, then serve it over HTTP
(``retom_jax/serve``; docs/serve.md)."""
from __future__ import annotations

import argparse
import time

from .options import (HelpFormatter, add_merge_options, add_mesh_options, add_model_options,
                      add_step_cache_options, apply_fast, check_merge_options, lora_arg,
                      merge_from_args, load_model, positive_int, step_cache_from_args)

__all__ = ["add_parser", "serve"]


def buckets_arg(text):
    try:
        values = tuple(sorted({int(v) for v in text.split(",")}))
    except ValueError:
        values = ()
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,2,4,8, got {text!r}")
    return values


def add_parser(sub):
    """Register ``retom-jax serve``."""
    s = sub.add_parser(
        "serve", help="serve a pipeline over HTTP (A1111 API, native API, web page)",
        formatter_class=HelpFormatter,
        description="Load and compile a pipeline once, then serve it: POST "
                    "/sdapi/v1/txt2img and /sdapi/v1/img2img (AUTOMATIC1111-compatible), POST "
                    "/retom/v1/generate (every retom-jax option), GET /health, the page at / "
                    "and the OpenAPI page at /docs. Requests sharing their settings are "
                    "batched into one call. SIGTERM finishes the requests in flight. Needs "
                    "the serve extra (pip install 'retom-jax[serve]').")
    add_model_options(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 opens the server to the network: set "
                        "a --token)")
    s.add_argument("--port", type=positive_int, default=7860, help="TCP port")
    s.add_argument("--token", default=None,
                   help="bearer token every API call must carry (default: the environment "
                        "variable RETOM_JAX_SERVE_TOKEN; unset: none)")
    s.add_argument("--steps", type=positive_int, default=20,
                   help="denoising steps of a request that names none")
    add_merge_options(s)  # the merge config of requests that name none (every A1111 request)
    add_step_cache_options(s)  # likewise the step cache
    s.add_argument("--lora", type=lora_arg, action="append", default=[],
                   metavar="FILE[:SCALE]",
                   help="fuse a LoRA file at start (repeatable); a request's lora_scale "
                        "multiplies the scales")
    add_mesh_options(s, "run on a device mesh, e.g. data=4 (the batch is split over it)")
    b = s.add_argument_group("batching and limits")
    b.add_argument("--max-batch", type=positive_int, default=None,
                   help="images gathered into one call at most (default: the largest of "
                        "--buckets; buckets above it are dropped)")
    b.add_argument("--max-wait", type=float, default=0.05,
                   help="seconds a request waits for others to share its call")
    b.add_argument("--buckets", type=buckets_arg, default=(1, 2, 4, 8),
                   help="batch sizes compiled, a call padded to the next; one bucket (e.g. 8) "
                        "makes every image come from one program, bit for bit the same "
                        "whatever the traffic")
    b.add_argument("--max-side", type=positive_int, default=1024,
                   help="largest width / height a request may ask for")
    b.add_argument("--max-steps", type=positive_int, default=150,
                   help="most steps a request may ask for")
    s.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="compile on the first request instead of before serving")
    s.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")
    s.set_defaults(handler=serve, subparser=s)
    return s


def serve(args, parser) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        parser.error("retom-jax serve needs fastapi and uvicorn: pip install 'retom-jax[serve]'")
    from ..serve.app import create_app
    from ..serve.run import serve_forever
    from ..serve.schemas import Limits

    if args.max_wait < 0:
        parser.error(f"--max-wait must be >= 0, got {args.max_wait}")
    try:
        apply_fast(args)
        check_merge_options(args)
        merge_from_args(args, 1)  # bad merge options fail before the model loads
        step_cache = step_cache_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    pipe, mesh = load_model(args, parser)
    if getattr(pipe, "unet", None) is None:
        parser.error(f"--model {args.model}: retom-jax serve runs UNet pipelines (SD 1.x/2.x, "
                     f"SDXL); {type(pipe).__name__} is not one")
    merge = merge_from_args(args, min(pipe.unet.config.attention_downsamples(), default=1))
    print(f"loaded {type(pipe).__name__} in {time.perf_counter() - t0:.2f} s", flush=True)
    t1 = time.perf_counter()
    try:
        app = create_app(pipe, token=args.token, max_batch=args.max_batch,
                         max_wait=args.max_wait, buckets=args.buckets,
                         limits=Limits(max_side=args.max_side, max_steps=args.max_steps,
                                       max_images=args.max_batch or max(args.buckets)),
                         default_steps=args.steps, merge=merge, step_cache=step_cache,
                         loras=[tuple(x) for x in args.lora], model_name=args.model,
                         warmup=args.warmup)
    except ValueError as e:
        parser.error(str(e))
    if args.warmup:
        print(f"compiled batches {list(app.state.engine.buckets)} in "
              f"{time.perf_counter() - t1:.2f} s", flush=True)
    auth = "bearer token required" if app.state.token else "no token"
    print(f"serving on http://{args.host}:{args.port} ({auth}); the page at /, the API at "
          f"/docs", flush=True)
    serve_forever(app, args.host, args.port, args.log_level)
    return 0
