"""``retom-jax eval``: what merging costs in image quality (the measuring is
:mod:`retom_jax.eval.run`'s)."""
from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp

from ..demo import DEMO_NOTICE
from ..io import write_text
from ..eval.clip_vision import load_clip
from ..eval.inception import InceptionError, load_inception
from ..eval.metrics import shard_models
from ..eval.prompts import read_prompts
from ..models.weights import CheckpointError
from ..pipelines import default_guidance_scale, load_pipeline
from ..sharding import batch_shards
from ..eval.run import (METHODS, check_generation, generate_images, markdown_table, measure,
                        plot, reference_paths, run_list, run_settings, write_json)
from .options import (HelpFormatter, add_merge_options, add_mesh_options,
                      add_model_options, add_step_cache_options, check_merge_options,
                      image_side, mesh_from_args, non_negative_int, positive_int,
                      step_cache_from_args)


def _methods(text):
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in METHODS]
    if not items or bad:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(METHODS)}, got {text!r}")
    return tuple(dict.fromkeys(items))


def _ratios(text):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ratios in (0, 1) like 0.3,0.5, got {text!r}")
    return tuple(dict.fromkeys(values))


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``retom-jax eval``."""
    e = sub.add_parser(
        "eval", help="measure what merging costs in image quality", formatter_class=HelpFormatter,
        description="Generate images for every merging method and ratio from the same seeds "
                    "and measure CLIP score, CMMD (--clip), FID (--inception), and PSNR/SSIM "
                    "against the unmerged images, with the seconds per image. Resumable: "
                    "images already in --out are kept. Nothing is ever downloaded.")
    add_model_options(e)
    e.add_argument("--prompts", default="builtin",
                   help="a text file with one prompt per line, or 'builtin' (100 ImageNet "
                        "class prompts)")
    e.add_argument("--num-prompts", type=positive_int, default=None,
                   help="use only the first N prompts")
    e.add_argument("--methods", type=_methods, default=("none", "tome", "retom"),
                   help="comma-separated: none, tome, retom, todo; 'none' is always made")
    e.add_argument("--ratios", type=_ratios, default=(0.3, 0.5),
                   help="merge ratios for tome and retom")
    e.add_argument("--steps", type=positive_int, default=50, help="denoising steps")
    e.add_argument("--seeds", type=positive_int, default=1, help="images per prompt, seeds 0..N-1")
    e.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the model's, 7.5; the demo model's 3)")
    e.add_argument("--height", type=image_side, default=None,
                   help="image height (default: the model's)")
    e.add_argument("--width", type=image_side, default=None,
                   help="image width (default: the model's)")
    add_merge_options(e, method=False, schedule=False)
    e.add_argument("--cache-step", type=non_negative_int, default=None,
                   help="retom: reuse the representatives chosen at this step")
    add_step_cache_options(e)
    e.add_argument("--clip", default=None,
                   help="CLIP model for CLIP score and CMMD: a local transformers CLIPModel "
                        "folder or a cached repo id (e.g. openai/clip-vit-large-patch14)")
    e.add_argument("--inception", default=None,
                   help="pytorch-fid's weight file pt_inception-2015-12-05-6726825d.pth (FID)")
    e.add_argument("--reference", default=None,
                   help="folder of reference images for FID and CMMD (default: the "
                        "unmerged images)")
    e.add_argument("--batch-size", type=positive_int, default=16, help="images per metric batch")
    add_mesh_options(e, "run on a device mesh, e.g. data=4,fsdp=2: each image's sampling "
                        "program and the CLIP / Inception batches split over data and fsdp "
                        "(--batch-size a multiple of both), the models placed by the sharding "
                        "rules; data takes the devices left")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(handler=run_eval, subparser=e)
    return e


def run_eval(args, parser) -> int:
    try:
        check_merge_options(args, args.methods)
        prompts = read_prompts(args.prompts)
        if args.num_prompts:
            prompts = prompts[:args.num_prompts]
        runs = run_list(args.methods, args.ratios, step_cache_from_args(args), args.fast)
        for method, ratio in runs:  # bad merge options fail here, before any model
            run_settings(args, method, ratio, 1)
        n_images = len(prompts) * args.seeds
        if (args.inception or args.clip) and n_images < 2 and not args.reference:
            raise ValueError(f"FID and CMMD need at least 2 images per run; {len(prompts)} "
                             f"prompt(s) x {args.seeds} seed(s) make {n_images}")
        if args.reference and not (args.clip or args.inception):
            raise ValueError("--reference is compared through CMMD (--clip) or FID "
                             "(--inception): give one of them")
        if args.reference:
            reference_paths(args.reference, check=True)
        if args.guidance is None:  # the model's default, recorded as the number used
            args.guidance = default_guidance_scale(args.model)
        check_generation(args, prompts, Path(args.out))
        mesh = mesh_from_args(args)
        if mesh is not None:
            if args.batch_size % batch_shards(mesh):
                raise ValueError(f"--batch-size {args.batch_size} does not divide over the "
                                 f"mesh's data x fsdp = {batch_shards(mesh)} devices: use a "
                                 f"multiple of {batch_shards(mesh)}")
    except ValueError as e:
        parser.error(str(e))
    # The metric models load first, so that a missing file fails before hours of sampling.
    clip = inception = None
    try:
        if args.clip:
            clip = load_clip(args.clip)
            print(f"CLIP: {clip.vision}" + ("" if clip.text is not None else
                                             " (image tower only: no CLIP score)"))
        if args.inception:
            inception = load_inception(args.inception)
            print(f"FID: {inception}")
        if args.model == "demo":
            print(DEMO_NOTICE)
        pipe = load_pipeline(args.model, jnp.dtype(args.dtype), scheduler=args.scheduler,
                             mesh=mesh)
        if mesh is not None:
            shard_models(mesh, clip, inception)
            print(f"mesh {dict(mesh.shape)} over {mesh.size} devices")
    except (CheckpointError, InceptionError) as e:
        parser.error(str(e))
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        timings = generate_images(pipe, args, prompts, runs, out)
    except ValueError as e:
        parser.error(str(e))
    try:
        rows = measure(args, prompts, runs, out, timings, clip, inception)
    except ValueError as e:  # an image file damaged while measuring
        parser.error(str(e))
    settings = {k: getattr(args, k) for k in (
        "model", "prompts", "num_prompts", "steps", "seeds", "guidance", "height", "width",
        "scheduler", "dtype", "window", "matching", "cache_step", "max_downsample",
        "todo_factor", "clip", "inception", "reference", "step_cache", "step_cache_depth",
        "fast")}
    settings.update(num_prompts=len(prompts), methods=list(args.methods),
                    mesh=None if mesh is None else dict(mesh.shape),
                    ratios=list(args.ratios),
                    reference=args.reference or "the unmerged ('none') images")
    try:  # atomic writes; io.OutputError (the disk is full ...) is one line
        write_json(out / "results.json", {"settings": settings, "rows": rows})
        write_text(out / "results.md", markdown_table(rows))
        print(markdown_table(rows), end="")
        drawn = plot(rows, out / "results.png")
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
          + (f", {out / 'results.png'}" if drawn else ""))
    if args.model == "demo":
        print("note: the demo model is a tiny model of coloured shapes: its numbers only show "
              "the mechanics.")
    return 0
