"""Generate one prompt and seed with and without ReToM, and save both side by side.

    python examples/generate_with_retom.py --model demo
    python examples/generate_with_retom.py --model path/to/stable-diffusion-v1-5 \\
        --prompt "a photo of an astronaut riding a horse" --steps 30 --ratio 0.5 \\
        --cache-step 5 --out retom_side_by_side.png

``--model`` takes a diffusers pipeline folder (SD 1.x/2.x or SDXL), a repo id already in
the local Hugging Face cache, or ``demo`` (the tiny built-in model trained on coloured
shapes: try ``--prompt "a red circle on a blue background"``). Both images start from the same noise; the left one has no
merging, the right one merges tokens with ReToM in the UNet's first attention level(s).
"""
from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
from PIL import Image, ImageDraw

from retom_jax import ReToM, load_pipeline


def side_by_side(left: Image.Image, right: Image.Image, labels=("no merging", "ReToM")):
    """One image: ``left`` and ``right`` next to each other with a caption strip above."""
    strip = 16
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height) + strip),
                       "white")
    canvas.paste(left, (0, strip))
    canvas.paste(right, (left.width, strip))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), labels[0], fill="black")
    draw.text((left.width + 4, 2), labels[1], fill="black")
    return canvas


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="pipeline folder, cached repo id or 'demo'")
    p.add_argument("--prompt", default="a photo of a cat")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=None,
                   help="default: the model's (7.5; the demo model's 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--ratio", type=float, default=0.5, help="share of tokens merged")
    p.add_argument("--window", type=int, nargs=2, default=(2, 2), metavar=("WH", "WW"))
    p.add_argument("--cache-step", type=int, default=None,
                   help="reuse the representatives chosen at this step afterwards")
    p.add_argument("--max-downsample", type=int, default=None,
                   help="default: the UNet's first attention level (1 for SD, 2 for SDXL)")
    p.add_argument("--scheduler", default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default="retom_side_by_side.png")
    args = p.parse_args(argv)

    if args.model == "demo":
        from retom_jax.demo import DEMO_NOTICE, build_demo_pipeline

        print(DEMO_NOTICE)
        pipe = build_demo_pipeline(jnp.dtype(args.dtype), scheduler=args.scheduler)
    else:
        pipe = load_pipeline(args.model, jnp.dtype(args.dtype), scheduler=args.scheduler)
    level = args.max_downsample or min(pipe.unet.config.attention_downsamples())
    retom = ReToM(ratio=args.ratio, window=tuple(args.window), cache_step=args.cache_step,
                  max_downsample=level)

    common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, seed=args.seed, height=args.height,
                  width=args.width)
    images = []
    for name, merge in (("no merging", None), ("ReToM", retom)):
        out = pipe(args.prompt, merge=merge, **common)
        print(f"{name}: {out.run_seconds:.3f} s per image, compile time {out.compile_seconds:.2f} s "
              f"(not included)")
        images.append(out.images[0])
    side_by_side(*images, labels=("no merging", f"ReToM ratio {args.ratio}")).save(args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
