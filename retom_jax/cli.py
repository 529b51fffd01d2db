"""Command line: ``retom-jax generate --model PATH_OR_ID --prompt "..." [options]``.

``--model demo`` runs a tiny built-in pipeline trained on the package's own synthetic shapes
("a red circle on a blue background"), so that the whole path can be tried without any
download.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

MERGES = ("none", "tome", "retom", "todo")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "half": "float16"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``retom-jax: error: ...``): the usage block is for
    ``--help``, not for every mistake."""

    def error(self, message):
        self.exit(2, f"retom-jax: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it has no default (None, a
    switch) or its help says the default itself."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text
                or action.default == [] or text.endswith(f"({action.default})")
                or isinstance(action, (argparse._VersionAction, argparse._HelpAction))):
            return text
        return super()._get_help_string(action)


def _dtype(text):
    name = DTYPE_ALIASES.get(text.lower(), text.lower())
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)}), got {text!r}")
    return name


def _seed(text):
    from .pipeline import SEED_LIMIT

    try:
        value = int(text, 0)
    except ValueError:
        value = None
    if value is None or not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**128), got {text!r}")
    return value


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low``, or a message saying what was expected."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _window(text):
    parts = text.lower().replace("*", "x").split("x")
    try:
        wh, ww = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a window like 2x2, got {text!r}") from None
    if wh < 1 or ww < 1:
        raise argparse.ArgumentTypeError(f"window sides must be positive, got {text!r}")
    return wh, ww


def _schedule_entry(text):
    step, sep, window = text.partition(":")
    try:
        step = int(step)
    except ValueError:
        step = None
    if not sep or step is None:
        raise argparse.ArgumentTypeError(f"expected STEP:WINDOW like 10:4x4, got {text!r}")
    return step, _window(window)


def _pair(text):
    """``HxW`` / ``TOPxLEFT`` (also ``H,W``) -> a tuple of two ints >= 0."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers like 1024x1024, got "
                                         f"{text!r}") from None
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return a, b


def _lora_spec(text):
    """``FILE`` or ``FILE:SCALE``."""
    from .lora import LoraError, parse_lora_spec

    try:
        return parse_lora_spec(text)
    except LoraError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# The diffusers call options (features.py) and their flags; None: not given.
FEATURE_FLAGS = {
    "guidance_rescale": "--guidance-rescale", "eta": "--eta", "clip_skip": "--clip-skip",
    "image": "--init-image", "strength": "--strength", "prompt_2": "--prompt-2",
    "negative_prompt_2": "--negative-prompt-2", "original_size": "--original-size",
    "crops_coords_top_left": "--crops-coords-top-left", "target_size": "--target-size",
    "negative_original_size": "--negative-original-size",
    "negative_crops_coords_top_left": "--negative-crops-coords-top-left",
    "negative_target_size": "--negative-target-size",
}


def add_feature_arguments(g) -> None:
    """img2img, LoRA, guidance rescale, clip skip, DDIM eta and SDXL's conditioning."""
    f = g.add_argument_group("pipeline features (as diffusers names them)")
    f.add_argument("--init-image", dest="image", metavar="FILE", default=None,
                   help="image-to-image: start from this image (its size sets the output's)")
    f.add_argument("--strength", type=float, default=None,
                   help="image-to-image: how much of the schedule runs, in (0, 1] (0.8; SDXL "
                        "0.3)")
    f.add_argument("--lora", type=_lora_spec, action="append", default=[],
                   metavar="FILE[:SCALE]",
                   help="fuse a LoRA .safetensors file (diffusers/peft or kohya) into the "
                        "weights, times SCALE (1); repeatable")
    f.add_argument("--guidance-rescale", type=float, default=None,
                   help="rescale the guided prediction's std towards the text one's, 0..1")
    f.add_argument("--clip-skip", type=_non_negative_int, default=None,
                   help="condition on the text encoder's output this many layers earlier")
    f.add_argument("--eta", type=float, default=None, help="DDIM's stochasticity, 0..1")
    f.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt")
    f.add_argument("--negative-prompt-2", default=None,
                   help="SDXL: the second text encoder's negative prompt")
    for name in ("original-size", "target-size", "negative-original-size",
                 "negative-target-size"):
        f.add_argument(f"--{name}", type=_pair, default=None, metavar="HxW",
                       help=f"SDXL: {name.replace('-', '_')} conditioning (height x width)")
    for name in ("crops-coords-top-left", "negative-crops-coords-top-left"):
        f.add_argument(f"--{name}", type=_pair, default=None, metavar="TOPxLEFT",
                       help=f"SDXL: {name.replace('-', '_')} conditioning")


def feature_options(args) -> dict:
    """The pipeline keyword options the flags ask for (the ones given only)."""
    out = {}
    for name in FEATURE_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    return out


BENCH_SCRIPTS = {"unet": "unet_speed", "merge": "merge_overhead", "pipeline": "pipeline_speed",
                 "torch": "torch_unet_speed", "report": "report", "plot": "plot",
                 "scaling": "scaling"}


def _mesh(text):
    from .sharding import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def bench(args, parser) -> int:
    """Run ``benchmarks/<script>.py``'s ``main`` with the remaining arguments."""
    import importlib

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (folder / "common.py").is_file():
        parser.error(f"no benchmarks/ folder beside the package ({folder}): the benchmarks ship "
                     "with the source checkout; install it with 'pip install -e .' from a clone")
    sys.path.insert(0, str(folder))
    argv0, sys.argv[0] = sys.argv[0], f"retom-jax bench {args.script}"  # the script's usage line
    try:
        return importlib.import_module(BENCH_SCRIPTS[args.script]).main(args.args)
    finally:
        sys.argv[0] = argv0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(
        prog="retom-jax", formatter_class=HelpFormatter,
        description="Stable Diffusion text-to-image in JAX with token merging (ToMe, ReToM, "
                    "ToDo) in the UNet.")
    parser.add_argument("--version", action="version", version=f"retom-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    g = sub.add_parser(
        "generate", help="generate an image from a prompt", formatter_class=HelpFormatter,
        description="Generate images from a prompt. --model takes a diffusers pipeline folder "
                    "(StableDiffusionPipeline or StableDiffusionXLPipeline), a repo id already "
                    "in the local Hugging Face cache, or 'demo' (tiny model trained on coloured "
                    "shapes). Nothing is ever downloaded. Options of a merge method other than the one "
                    "chosen with --merge are errors, not ignored.")
    g.add_argument("--model", required=True, help="pipeline folder, cached repo id, or 'demo'")
    g.add_argument("--prompt", required=True,
                   help="what to draw (CLIP reads 77 tokens; a longer prompt is cut, with a "
                        "warning)")
    g.add_argument("--negative-prompt", default=None,
                   help="what to steer away from (needs --guidance above 1)")
    g.add_argument("--steps", type=_positive_int, default=50, help="denoising steps")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; <= 1 turns guidance off (default: "
                        "the model's, 7.5; the demo model's 3)")
    g.add_argument("--height", type=_positive_int, default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's)")
    g.add_argument("--width", type=_positive_int, default=None,
                   help="image width in pixels, a multiple of 8 (default: the model's)")
    g.add_argument("--seed", type=_seed, default=0,
                   help="random seed of the initial noise, an integer in [0, 2**128); every "
                        "bit of it counts")
    g.add_argument("--num-images", type=_positive_int, default=1,
                   help="images generated for the prompt (one batch)")
    g.add_argument("--scheduler", default=None,
                   help="ddim, pndm, euler, euler_a, dpm++2m, dpm++2m_karras (default: the "
                        "model's own)")
    g.add_argument("--merge", choices=MERGES, default="none", help="token merging method")
    g.add_argument("--ratio", type=float, default=None,
                   help="tome, retom: share of tokens merged (default 0.5)")
    g.add_argument("--max-downsample", type=_positive_int, default=None,
                   help="tome, retom, todo: merge at UNet levels downsampled at most this much "
                        "(default: the UNet's first attention level: 1 for SD, 2 for SDXL)")
    g.add_argument("--window", type=_window, default=None,
                   help="retom: window of one representative, e.g. 2x2; tome: cell (sy x sx) "
                        "(default 2x2). ReToM merges whole windows only: where the token grid "
                        "is not a multiple of the window, its last rows/columns stay unmerged "
                        "(a note says so)")
    g.add_argument("--matching", choices=("local", "global"), default=None,
                   help="retom: a source merges into its window's representative (local) or "
                        "the most similar one (global) (default local)")
    g.add_argument("--cache-step", type=_non_negative_int, default=None,
                   help="retom: reuse the representatives chosen at this step (0-based) at "
                        "every later step; must be below the last step (default: choose at "
                        "every step)")
    g.add_argument("--window-schedule", type=_schedule_entry, nargs="+", default=None,
                   metavar="STEP:WINDOW",
                   help="retom: windows that change over the steps, e.g. '10:4x4 20:2x2' "
                        "(--window until step 10, then 4x4, from step 20 2x2); every step must "
                        "come before the last (default: none)")
    g.add_argument("--todo-factor", type=_positive_int, default=None,
                   help="todo: keys/values pooled by this factor (default 2)")
    g.add_argument("--dtype", type=_dtype, default="float32", metavar="{" + ",".join(DTYPES) + "}",
                   help="compute dtype of the models; bf16, fp16, fp32 are accepted too")
    g.add_argument("--out", default="retom-jax.png",
                   help="output image file (checked before the model loads); with several "
                        "images, -0, -1 ... are appended")
    g.add_argument("--progress", action="store_true",
                   help="show a progress bar over the steps (runs one step at a time)")
    from .eval.mergemap import add_merge_map_arguments  # --merge-map (retom_jax/eval/mergemap.py)
    add_merge_map_arguments(g)
    add_feature_arguments(g)
    g.add_argument("--mesh", type=_mesh, default=None, metavar="AXIS=N,...",
                   help="run on a device mesh, e.g. data=4,fsdp=2 or spatial=2 (axes data, "
                        "fsdp, spatial; data takes the devices left unless given)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-host run first (jax.distributed; run the same command "
                        "on every host; process 0 writes the images)")
    g.set_defaults(handler=generate, subparser=g)

    b = sub.add_parser(
        "bench", help="run a benchmark script from the checkout's benchmarks/ folder",
        formatter_class=HelpFormatter,
        description="Run one of the scripts in benchmarks/ (see benchmarks/README.md); "
                    "everything after the script name is passed to it, e.g. "
                    "'retom-jax bench unet --preset tiny --out unet.json'.")
    b.add_argument("script", choices=sorted(BENCH_SCRIPTS),
                   help="; ".join(f"{k}: benchmarks/{v}.py" for k, v in sorted(BENCH_SCRIPTS.items())))
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    b.set_defaults(handler=bench, subparser=b)

    from .eval.run import add_eval_parser  # retom-jax eval (retom_jax/eval/run.py)
    add_eval_parser(sub)
    from .train import add_train_parser  # `retom-jax train` (fine-tuning, the demo model)
    add_train_parser(sub)
    return parser


# Which --merge methods use each option (an option given for another method is an error).
MERGE_OPTIONS = {"ratio": ("tome", "retom"), "window": ("tome", "retom"),
                 "matching": ("retom",), "cache_step": ("retom",),
                 "window_schedule": ("retom",), "todo_factor": ("todo",),
                 "max_downsample": ("tome", "retom", "todo")}


def check_merge_options(args):
    """ValueError for an option the chosen --merge method does not use (or a merge-map
    option without --merge-map)."""
    for name in ("merge_map_step", "merge_map_level"):
        if getattr(args, name, None) is not None and not getattr(args, "merge_map", None):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} needs --merge-map FILE.png (it says where to take it)")
    for name, users in MERGE_OPTIONS.items():
        if getattr(args, name, None) is not None and args.merge not in users:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} is an option of --merge {' or '.join(users)}, not of "
                             f"--merge {args.merge}: drop it or change --merge")


def merge_config(method: str, ratio: float = 0.5, max_downsample: int = 1, *,
                 window=(2, 2), matching: str = "local", cache_step=None, cache=None,
                 schedule=(), todo_factor: int = 2):
    """The merge config of ``method`` ("tome", "retom", "todo"; None for "none"): what the
    command line's options and the benchmarks build (ValueError if they make none)."""
    from .merge import ReToM, ToDo, ToMe

    if method == "tome":
        sy, sx = window
        return ToMe(ratio=ratio, max_downsample=max_downsample, sx=sx, sy=sy)
    if method == "retom":
        extra = {} if cache is None else {"cache": cache}
        return ReToM(ratio=ratio, window=window, matching=matching, cache_step=cache_step,
                     max_downsample=max_downsample, schedule=tuple(schedule), **extra)
    if method == "todo":
        return ToDo(factor=todo_factor, max_downsample=max_downsample)
    if method == "none":
        return None
    raise ValueError(f"unknown merging method {method!r}; choose from tome, retom, todo, none")


def make_merge(args, first_level: int):
    """The merge config the options ask for (ValueError if they do not make one)."""
    return merge_config(args.merge, 0.5 if args.ratio is None else args.ratio,
                        args.max_downsample or first_level, window=args.window or (2, 2),
                        matching=args.matching or "local", cache_step=args.cache_step,
                        schedule=args.window_schedule or (), todo_factor=args.todo_factor or 2)


def _output_paths(out: str, n: int) -> list[Path]:
    """The files to write, checked before anything is loaded: a format PIL writes (an RGB
    image), not a folder, in a folder that exists or can be made, writable."""
    from PIL import Image

    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out!r} is a folder: name an image file, e.g. "
                         f"{str(path / 'image.png')!r}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"--out {out!r}: unknown image extension {path.suffix!r} (use .png)")
    if fmt not in Image.SAVE:
        raise ValueError(f"--out {out!r}: PIL reads {fmt} files but cannot write them "
                         f"(use .png)")
    try:
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
    except Exception as e:  # noqa: BLE001 - any failure of PIL's writer
        raise ValueError(f"--out {out!r}: PIL cannot write an RGB image as {fmt} ({e}); "
                         f"use .png") from None
    paths = [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}")
                                   for i in range(n)]
    for p in paths:
        if p.is_dir():
            raise ValueError(f"--out {str(p)!r} is a folder: name an image file, e.g. "
                             f"{str(p / 'image.png')!r}")
        if p.exists() and not os.access(p, os.W_OK):
            raise ValueError(f"--out {str(p)!r} exists and cannot be overwritten")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out!r}: {str(folder)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"--out {out!r}: cannot write in {str(folder)!r} "
                         f"({e.strerror or e})") from None
    return paths


def _edge_note(pipe, merge, height, width) -> str | None:
    """One line when ReToM's windows leave the last rows/columns of a token grid unmerged
    (it merges whole windows only), else None."""
    if merge is None or not merge.merges_whole_windows_only:
        return None
    f = pipe.vae_scale_factor
    default = pipe.default_size or (0, 0)
    lh, lw = (height or default[0]) // f, (width or default[1]) // f
    notes = []
    for d in pipe.unet.config.attention_downsamples():
        if not merge.applies(d):
            continue
        h, w = -(-lh // d), -(-lw // d)
        for step, (wh, ww) in merge.windows(d):
            if wh <= h and ww <= w and (h % wh or w % ww):
                at = f" from step {step}" if step else ""
                notes.append(f"the {h}x{w} token grid (downsample {d}) leaves {h % wh} row(s) "
                             f"and {w % ww} column(s) outside the {wh}x{ww} windows{at}")
    if not notes:
        return None
    return (f"note: {type(merge).__name__} merges whole windows only, so edge tokens stay "
            "unmerged: "
            + "; ".join(dict.fromkeys(notes)))


def _show_warning(seen):
    """``warnings.showwarning`` for the command line: each message once, on one line."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in seen:
            seen.add(text)
            print(f"retom-jax: warning: {text}", file=sys.stderr, flush=True)
    return show


def generate(args, parser) -> int:
    from .weights import CheckpointError

    try:
        paths = _output_paths(args.out, args.num_images)
        check_merge_options(args)
        make_merge(args, 1)  # bad merge options fail here, before any model is built
    except ValueError as e:
        parser.error(str(e))
    from .eval.mergemap import check_merge_map_args, save_merge_map_from_args
    check_merge_map_args(args, parser)
    t0 = time.perf_counter()
    mesh = None
    try:
        if args.distributed:
            from .sharding import initialize_distributed

            initialize_distributed()
        if args.mesh is not None:
            from .sharding import make_mesh

            mesh = make_mesh(**{"data": -1, **args.mesh})
        if args.model == "demo":
            from .demo import DEMO_NOTICE

            print(DEMO_NOTICE)
        from . import pipeline

        pipe = pipeline.load_pipeline(args.model, args.dtype, scheduler=args.scheduler,
                                      mesh=mesh)
    except (CheckpointError, ValueError) as e:
        parser.error(f"--model {args.model}: {e}" if isinstance(e, CheckpointError) else str(e))
    for file, scale in args.lora:
        try:
            pipe.load_lora(file, scale)
        except ValueError as e:
            parser.error(f"--lora {file}: {e}")
    if mesh is not None and args.lora:  # the fused weights placed by the rules again
        pipe.shard(mesh)
    print(f"loaded {type(pipe).__name__} in {time.perf_counter() - t0:.2f} s"
          + (f" with {len(args.lora)} LoRA file(s)" if args.lora else ""))
    options = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, height=args.height, width=args.width,
                   num_images_per_prompt=args.num_images, merge=None, output_type="pil",
                   **feature_options(args))
    try:
        merge = options["merge"] = make_merge(
            args, min(pipe.unet.config.attention_downsamples(), default=1))
        print("compiling ... (once per size, step count and merge setting)", flush=True)
        compile_s = pipe.compile(args.prompt, progress=args.progress, **options)
        print(f"compiled in {compile_s:.2f} s")
        out = pipe(args.prompt, seed=args.seed, progress=args.progress, **options)
    except ValueError as e:
        parser.error(str(e))
    import jax

    if mesh is not None:
        print(f"mesh {dict(mesh.shape)} over {mesh.size} devices")
    for image, path in zip(out.images if jax.process_index() == 0 else [], paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"saved {path} ({image.width}x{image.height})")
    note = _edge_note(pipe, merge, out.images[0].height, out.images[0].width)
    if note:
        print(note)
    if args.merge_map:  # generates the first image again through a probe (eval/mergemap.py)
        save_merge_map_from_args(args, parser, pipe, merge, **feature_options(args))
    n = len(out.images)
    merge_text = "no merging" if merge is None else repr(merge)
    print(f"time per image: {out.run_seconds / n:.3f} s ({n} image(s), {args.steps} steps, "
          f"{merge_text}; compile time excluded)")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)  # shown once each by _show_warning
        warnings.showwarning = _show_warning(set())
        return args.handler(args, args.subparser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
