"""Options shared by the subcommands (model, dtype, seed, merge, mesh, pipeline
features), each added once with its default shown in ``--help``.
"""
from __future__ import annotations

import argparse

from .. import pipelines
from ..demo import DEMO_NOTICE
from ..merge import METHOD_OPTIONS, from_options
from ..models.weights import CheckpointError
from ..pipelines.step_cache import FAST, parse_step_cache
from ..sharding import make_mesh, parse_mesh


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


def dtype_arg(text):
    name = DTYPE_ALIASES.get(text.lower(), text.lower())
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)}), got {text!r}")
    return name


def seed_arg(text):
    from ..pipelines.request import SEED_LIMIT

    try:
        value = int(text, 0)
    except ValueError:
        value = None
    if value is None or not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**128), got {text!r}")
    return value


def int_at_least(low: int, what: str):
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


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")


def image_side(text):
    """An image side in pixels: a positive integer up to 16384 (pipelines' MAX_SIDE)."""
    value = positive_int(text)
    if value > 16384:
        raise argparse.ArgumentTypeError(f"{value} pixels is more than 16384, beyond what any "
                                         f"Stable Diffusion model makes")
    return value


def window_arg(text):
    parts = text.lower().replace("*", "x").split("x")
    try:
        wh, ww = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a window like 2x2, got {text!r}") from None
    if wh < 1 or ww < 1:
        raise argparse.ArgumentTypeError(f"window sides must be positive, got {text!r}")
    return wh, ww


def schedule_entry(text):
    step, sep, window = text.partition(":")
    try:
        step = int(step)
    except ValueError:
        step = None
    if not sep or step is None:
        raise argparse.ArgumentTypeError(f"expected STEP:WINDOW like 10:4x4, got {text!r}")
    return step, window_arg(window)


def pair_arg(text):
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


def lora_arg(text):
    """``FILE`` or ``FILE:SCALE``."""
    from ..models.lora import LoraError, parse_lora_spec

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
                        "0.3; Flux and SD3 0.6)")
    f.add_argument("--lora", type=lora_arg, action="append", default=[],
                   metavar="FILE[:SCALE]",
                   help="fuse a LoRA .safetensors file (diffusers/peft or kohya) into the "
                        "weights, times SCALE (1); repeatable")
    f.add_argument("--guidance-rescale", type=float, default=None,
                   help="rescale the guided prediction's std towards the text one's, 0..1")
    f.add_argument("--clip-skip", type=non_negative_int, default=None,
                   help="condition on the text encoder's output this many layers earlier")
    f.add_argument("--eta", type=float, default=None, help="DDIM's stochasticity, 0..1")
    f.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt")
    f.add_argument("--negative-prompt-2", default=None,
                   help="SDXL: the second text encoder's negative prompt")
    for name in ("original-size", "target-size", "negative-original-size",
                 "negative-target-size"):
        f.add_argument(f"--{name}", type=pair_arg, default=None, metavar="HxW",
                       help=f"SDXL: {name.replace('-', '_')} conditioning (height x width)")
    for name in ("crops-coords-top-left", "negative-crops-coords-top-left"):
        f.add_argument(f"--{name}", type=pair_arg, default=None, metavar="TOPxLEFT",
                       help=f"SDXL: {name.replace('-', '_')} conditioning")


def feature_options(args) -> dict:
    """The pipeline keyword options the flags ask for (the ones given only)."""
    out = {}
    for name in FEATURE_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    return out


def mesh_arg(text):
    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ----------------------------------------------------------------------------- option groups
# Each option is defined once here; generate, train, eval and serve add the groups they use.

def add_model_options(p, *, scheduler: bool = True, dtype_help: str = "compute dtype of the "
                      "models; bf16, fp16, fp32 are accepted too") -> None:
    """--model, --dtype (and --scheduler)."""
    p.add_argument("--model", required=True,
                   help="diffusers pipeline folder, repo id in the local Hugging Face cache, "
                        "or 'demo' (the built-in model)")
    p.add_argument("--dtype", type=dtype_arg, default="float32",
                   metavar="{" + ",".join(DTYPES) + "}", help=dtype_help)
    if scheduler:
        p.add_argument("--scheduler", default=None,
                       help="ddim, pndm, euler, euler_a, dpm++2m, dpm++2m_karras (default: the "
                            "model's own)")


def add_merge_options(p, *, method: bool = True, schedule: bool = True) -> None:
    """The token-merging options. ``method``: --merge and --ratio (eval chooses methods and
    ratios as lists instead); ``schedule``: ReToM's --cache-step and --window-schedule
    (sampling only). An option of a method other than the chosen one is an error
    (:func:`check_merge_options`), so every default here is None and stated in the help."""
    g = p.add_argument_group("token merging")
    if method:
        g.add_argument("--merge", choices=MERGES, default="none", help="token merging method")
        g.add_argument("--ratio", type=float, default=None,
                       help="tome, retom: share of tokens merged (default 0.5)")
    g.add_argument("--max-downsample", type=positive_int, default=None,
                   help="tome, retom, todo: merge at UNet levels downsampled at most this much "
                        "(default: the UNet's first attention level: 1 for SD, 2 for SDXL)")
    g.add_argument("--window", type=window_arg, default=None,
                   help="retom: window of one representative, e.g. 2x2; tome: cell (sy x sx) "
                        "(default 2x2). ReToM merges whole windows only: where the token grid "
                        "is not a multiple of the window, its last rows/columns stay unmerged")
    g.add_argument("--matching", choices=("local", "near", "global"), default=None,
                   help="retom: a source merges into its window's representative (local), "
                        "the most similar one of its own and the 8 neighbouring windows "
                        "(near) or the most similar one anywhere (global) (default local)")
    if schedule:
        g.add_argument("--cache-step", type=non_negative_int, default=None,
                       help="retom: reuse the representatives chosen at this step (0-based) at "
                            "every later step; must be below the last step (default: choose "
                            "at every step)")
        g.add_argument("--window-schedule", type=schedule_entry, nargs="+", default=None,
                       metavar="STEP:WINDOW",
                       help="retom: windows that change over the steps, e.g. '10:4x4 20:2x2' "
                            "(--window until step 10, then 4x4, from step 20 2x2); every step "
                            "must come before the last (default: none)")
    g.add_argument("--todo-factor", type=positive_int, default=None,
                   help="todo: keys/values pooled by this factor (default 2)")


def add_step_cache_options(p, *, fast: bool = True) -> None:
    """--step-cache N, --step-cache-depth D and (``fast``) the --fast preset."""
    g = p.add_argument_group("step caching (DeepCache)")
    g.add_argument("--step-cache", type=positive_int, default=None, metavar="N",
                   help="a full UNet call every N steps, in between only the outer "
                        "--step-cache-depth levels on the cached deeper feature (default: "
                        "no caching; 1 is the same)")
    g.add_argument("--step-cache-depth", type=positive_int, default=None, metavar="D",
                   help="outer UNet levels a cached step runs (default 1)")
    if fast:
        g.add_argument("--fast", action="store_true",
                       help=f"the speed preset: {FAST.describe()}; --merge, --ratio and "
                            f"--step-cache given beside it win (docs/step_caching.md)")


def apply_fast(args) -> None:
    """Fill in the --fast preset where the options leave it open (sampling commands)."""
    if not getattr(args, "fast", False):
        return
    if args.merge == "none":
        args.merge = FAST.method
        if args.ratio is None and FAST.method in ("tome", "retom"):
            args.ratio = FAST.ratio
    if args.step_cache is None:
        args.step_cache = FAST.interval
        if args.step_cache_depth is None:
            args.step_cache_depth = FAST.depth


def step_cache_from_args(args):
    """The StepCache the options ask for, or None."""
    if args.step_cache_depth is not None and args.step_cache is None:
        raise ValueError("--step-cache-depth needs --step-cache N")
    return parse_step_cache(args.step_cache, args.step_cache_depth or 1)


def add_mesh_options(p, help_text: str, *, distributed: bool = False) -> None:
    """--mesh (and --distributed)."""
    p.add_argument("--mesh", type=mesh_arg, default=None, metavar="AXIS=N,...", help=help_text)
    if distributed:
        p.add_argument("--distributed", action="store_true",
                       help="join a multi-host run first (jax.distributed; run the same command "
                            "on every host; process 0 writes the files)")


# ----------------------------------------------------------------------------- reading them

# Flag name -> from_options keyword, where they differ.
_FLAG_KEYWORDS = {"window_schedule": "schedule"}


def check_merge_options(args, methods=None):
    """ValueError for an option that none of the chosen methods uses (``methods``: the
    --merge method by default), or a merge-map option without --merge-map."""
    for name in ("merge_map_step", "merge_map_level"):
        if getattr(args, name, None) is not None and not getattr(args, "merge_map", None):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} needs --merge-map FILE.png (it says where to take it)")
    methods = (args.merge,) if methods is None else tuple(methods)
    for flag_name, keyword in [(n, _FLAG_KEYWORDS.get(n, n)) for n in
                               ("ratio", "window", "matching", "cache_step", "window_schedule",
                                "todo_factor", "max_downsample")]:
        users = METHOD_OPTIONS[keyword]
        if getattr(args, flag_name, None) is not None and not set(methods) & set(users):
            flag = "--" + flag_name.replace("_", "-")
            chosen = " and ".join(methods)
            raise ValueError(f"{flag} is an option of --merge {' or '.join(users)}, not of "
                             f"--merge {chosen}: drop it or change --merge")


def merge_from_args(args, first_level: int, method: str | None = None, ratio=None):
    """The merge config the options ask for (``method``/``ratio`` override --merge/--ratio;
    an option not given takes :func:`merge.from_options`' default)."""
    method = args.merge if method is None else method
    ratio = getattr(args, "ratio", None) if ratio is None else ratio
    given = {"window": args.window, "matching": args.matching,
             "cache_step": getattr(args, "cache_step", None),
             "schedule": getattr(args, "window_schedule", None),
             "todo_factor": args.todo_factor, "ratio": ratio}
    return from_options(method, max_downsample=args.max_downsample or first_level,
                        **{k: v for k, v in given.items() if v is not None})


def mesh_from_args(args):
    """The mesh --mesh asks for (``data`` takes the devices left unless given), or None."""
    if getattr(args, "mesh", None) is None:
        return None
    return make_mesh(**{"data": -1, **args.mesh})


def load_model(args, parser):
    """The pipeline --model names, on the mesh --mesh asks for (the demo model's notice
    printed first); a bad folder or option is one ``parser.error`` line."""
    try:
        mesh = mesh_from_args(args)
        if args.model == "demo":
            print(DEMO_NOTICE)
        # looked up on the package at call time, so a test can spy on it
        pipe = pipelines.load_pipeline(args.model, args.dtype, scheduler=args.scheduler,
                                       mesh=mesh)
    except (CheckpointError, ValueError) as e:
        parser.error(f"--model {args.model}: {e}" if isinstance(e, CheckpointError) else str(e))
    return pipe, mesh
