"""``retom-jax generate --model PATH_OR_ID --prompt "..." [options]``.

``--model demo`` runs a tiny built-in pipeline trained on the package's own synthetic shapes
("a red circle on a blue background"), so that the whole path can be tried without any
download.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import jax

from ..io import save_image
from ..eval.mergemap import (add_merge_map_arguments, check_merge_map_args,
                             save_merge_map_from_args)
from ..pipelines import FluxPipeline
from ..sharding import initialize_distributed
from .options import (FEATURE_FLAGS, HelpFormatter, add_feature_arguments, add_merge_options,
                      add_step_cache_options, apply_fast, step_cache_from_args,
                      add_mesh_options, add_model_options, check_merge_options, feature_options,
                      image_side, merge_from_args, load_model, positive_int, seed_arg)


def add_parser(sub):
    """Register ``retom-jax generate``."""
    g = sub.add_parser(
        "generate", help="generate an image from a prompt", formatter_class=HelpFormatter,
        description="Generate images from a prompt. --model takes a diffusers pipeline folder "
                    "(StableDiffusionPipeline, StableDiffusionXLPipeline or FluxPipeline), a repo id already "
                    "in the local Hugging Face cache, or 'demo' (tiny model trained on coloured "
                    "shapes). Nothing is ever downloaded. Options of a merge method other than "
                    "the one chosen with --merge are errors, not ignored.")
    add_model_options(g)
    g.add_argument("--prompt", required=True,
                   help="what to draw (CLIP reads 77 tokens; a longer prompt is cut, with a "
                        "warning)")
    g.add_argument("--negative-prompt", default=None,
                   help="what to steer away from (needs --guidance above 1)")
    g.add_argument("--steps", type=positive_int, default=50, help="denoising steps")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; <= 1 turns guidance off (default: "
                        "the model's, 7.5; the demo model's 3)")
    g.add_argument("--true-cfg-scale", type=float, default=None,
                   help="Flux: diffusers' true classifier-free guidance with --negative-prompt "
                        "(above 1; the negative rows double the transformer batch)")
    g.add_argument("--height", type=image_side, default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's)")
    g.add_argument("--width", type=image_side, default=None,
                   help="image width in pixels, a multiple of 8 (default: the model's)")
    g.add_argument("--seed", type=seed_arg, default=0,
                   help="random seed of the initial noise, an integer in [0, 2**128); every "
                        "bit of it counts")
    g.add_argument("--num-images", type=positive_int, default=1,
                   help="images generated for the prompt (one batch)")
    g.add_argument("--out", default="retom-jax.png",
                   help="output image file (checked before the model loads); with several "
                        "images, -0, -1 ... are appended")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (without it an existing --out or "
                        "--merge-map file is an error)")
    g.add_argument("--progress", action="store_true",
                   help="show a progress bar over the steps (runs one step at a time)")
    add_merge_options(g)
    add_step_cache_options(g)
    add_merge_map_arguments(g)
    add_feature_arguments(g)
    add_mesh_options(g, "run on a device mesh, e.g. data=4,fsdp=2 or spatial=2 (axes data, "
                        "fsdp, spatial; data takes the devices left unless given)",
                     distributed=True)
    g.set_defaults(handler=generate, subparser=g)
    return g


def _output_paths(out: str, n: int, overwrite: bool = False) -> list[Path]:
    """The files to write, checked before anything is loaded: a format PIL writes (an RGB
    image), not a folder, not an existing file unless ``overwrite``, in a folder that
    exists or can be made, writable."""
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
        if p.exists() and not overwrite:
            raise ValueError(f"--out {str(p)!r} exists: pass --overwrite to replace it, or "
                             f"name another file")
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


def generate(args, parser) -> int:
    try:
        paths = _output_paths(args.out, args.num_images, args.overwrite)
        apply_fast(args)
        step_cache = step_cache_from_args(args)
        check_merge_options(args)
        merge_from_args(args, 1)  # bad merge options fail here, before any model is built
    except ValueError as e:
        parser.error(str(e))
    check_merge_map_args(args, parser)
    t0 = time.perf_counter()
    if args.distributed:
        initialize_distributed()
    pipe, mesh = load_model(args, parser)
    for file, scale in args.lora:
        try:
            pipe.load_lora(file, scale)
        except ValueError as e:
            parser.error(f"--lora {file}: {e}")
    if mesh is not None and args.lora:  # the fused weights placed by the rules again
        pipe.shard(mesh)
    print(f"loaded {type(pipe).__name__} in {time.perf_counter() - t0:.2f} s"
          + (f" with {len(args.lora)} LoRA file(s)" if args.lora else ""))
    if isinstance(pipe, FluxPipeline):
        return _generate_flux(args, parser, pipe, paths)
    if args.true_cfg_scale is not None:
        parser.error(f"--true-cfg-scale: not supported for a {type(pipe).__name__} (use "
                     f"--guidance)")
    options = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, height=args.height, width=args.width,
                   num_images_per_prompt=args.num_images, merge=None, output_type="pil",
                   step_cache=step_cache, **feature_options(args))
    try:
        merge = options["merge"] = merge_from_args(
            args, min(pipe.unet.config.attention_downsamples(), default=1))
        print("compiling ... (once per size, step count and merge setting)", flush=True)
        compile_s = pipe.compile(args.prompt, progress=args.progress, **options)
        print(f"compiled in {compile_s:.2f} s")
        out = pipe(args.prompt, seed=args.seed, progress=args.progress, **options)
    except ValueError as e:
        parser.error(str(e))
    if mesh is not None:
        print(f"mesh {dict(mesh.shape)} over {mesh.size} devices")
    for image, path in zip(out.images if jax.process_index() == 0 else [], paths):
        try:  # atomic; an existing file is replaced only with --overwrite
            save_image(image, path, overwrite=args.overwrite)
        except ValueError as e:  # io.OutputError: the disk is full, ...
            parser.error(str(e))
        print(f"saved {path} ({image.width}x{image.height})")
    note = _edge_note(pipe, merge, out.images[0].height, out.images[0].width)
    if note:
        print(note)
    if args.merge_map:  # generates the first image again through a probe (eval/mergemap.py)
        save_merge_map_from_args(args, parser, pipe, merge, **feature_options(args))
    n = len(out.images)
    merge_text = "no merging" if merge is None else repr(merge)
    if step_cache is not None:
        merge_text += f", {step_cache.describe()}"
    print(f"time per image: {out.run_seconds / n:.3f} s ({n} image(s), {args.steps} steps, "
          f"{merge_text}; compile time excluded)")
    return 0


def _generate_flux(args, parser, pipe, paths) -> int:
    """``generate`` for a diffusion transformer pipeline (Flux, and SD3 which shares its
    machinery): of the SD call options only --init-image / --strength (image-to-image);
    Flux's negative prompt needs --true-cfg-scale (diffusers' true CFG); the merge method
    merges attention and MLP (where merging pays in a transformer, see docs/transformers.md)."""
    import dataclasses

    image_options = {k: v for k, v in feature_options(args).items()
                     if k in ("image", "strength")}
    unsupported = [FEATURE_FLAGS[k] for k in feature_options(args) if k not in image_options]
    if args.true_cfg_scale is not None and type(pipe) is not FluxPipeline:
        unsupported.append("--true-cfg-scale")
    if args.merge_map:
        unsupported.append("--merge-map")
    if unsupported:
        parser.error(f"{', '.join(unsupported)}: not supported for a {type(pipe).__name__}")
    try:
        merge = merge_from_args(args, 1)
        if merge is not None and hasattr(merge, "merge_mlp"):
            merge = dataclasses.replace(merge, merge_mlp=True)
        if args.true_cfg_scale is not None:
            image_options["true_cfg_scale"] = args.true_cfg_scale
        options = dict(negative_prompt=args.negative_prompt,
                       num_inference_steps=args.steps, guidance_scale=args.guidance,
                       height=args.height, width=args.width,
                       num_images_per_prompt=args.num_images, merge=merge, **image_options)
        print("compiling ... (once per size, step count and merge setting)", flush=True)
        if not args.progress:
            print(f"compiled in {pipe.compile(args.prompt, **options):.2f} s")
        out = pipe(args.prompt, seed=args.seed, progress=args.progress, **options)
    except ValueError as e:
        parser.error(str(e))
    for image, path in zip(out.images if jax.process_index() == 0 else [], paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"saved {path} ({image.width}x{image.height})")
    n = len(out.images)
    merge_text = "no merging" if merge is None else repr(merge)
    print(f"time per image: {out.run_seconds / n:.3f} s ({n} image(s), {args.steps} steps, "
          f"{merge_text}; compile time excluded)")
    return 0
