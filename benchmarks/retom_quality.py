"""ReToM's settings against ToMe and ToDo on the demo model: PSNR to the unmerged images and
the caption checks (``shapes.check_colors``), per named variant and ratio.

Each variant is a merge config built from a name (see ``VARIANTS``); the unmerged images
of the same prompts and seeds are made once. Used for the search written up in
``docs/retom_quality.md``::

    python benchmarks/retom_quality.py --variants tome retom retom_global --ratios 0.5 \
        --every 3 --seeds 0 --out results/retom_search.json     # a 30-caption subset
    python benchmarks/retom_quality.py --ratios 0.3 0.5 0.7 --seeds 0 1 \
        --out docs/retom_quality.json                           # all 90 captions x 2 seeds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import numpy as np  # noqa: E402
from demo_quality import psnr, summary  # noqa: E402

from retom_jax import shapes  # noqa: E402

# name -> (method, options); ratio is added per row ("todo" ignores it: factor 2)
VARIANTS = {
    "tome": ("tome", {}),
    "todo": ("todo", {}),
    "retom": ("retom", {}),
    "retom_global": ("retom", dict(matching="global")),
    "retom_near": ("retom", dict(matching="near")),
    "retom_near2": ("retom", dict(matching="near", reach=2)),
    "retom_near_cs0": ("retom", dict(matching="near", cache_step=0)),
    "retom_near_cs5": ("retom", dict(matching="near", cache_step=5)),
    "retom_near_plan5": ("retom", dict(matching="near", cache_step=5, cache="plan")),
    "retom_near_2x4": ("retom", dict(matching="near", window=(2, 4))),
    "retom_kv": ("retom", dict(kv_only=True)),
    "retom_kv_near": ("retom", dict(kv_only=True, matching="near")),
    "retom_kv_global": ("retom", dict(kv_only=True, matching="global")),
    "retom_cs0": ("retom", dict(cache_step=0)),
    "retom_cs2": ("retom", dict(cache_step=2)),
    "retom_cs5": ("retom", dict(cache_step=5)),
    "retom_cs10": ("retom", dict(cache_step=10)),
    "retom_global_cs0": ("retom", dict(matching="global", cache_step=0)),
    "retom_global_cs5": ("retom", dict(matching="global", cache_step=5)),
    "retom_global_cs10": ("retom", dict(matching="global", cache_step=10)),
    "retom_1x2": ("retom", dict(window=(1, 2))),
    "retom_2x1": ("retom", dict(window=(2, 1))),
    "retom_2x4": ("retom", dict(window=(2, 4))),
    "retom_4x4": ("retom", dict(window=(4, 4))),
    "retom_global_4x4": ("retom", dict(matching="global", window=(4, 4))),
    "retom_sched_4x4_2x2": ("retom", dict(window=(4, 4), schedule=((10, (2, 2)),))),
    "retom_sched_2x2_4x4": ("retom", dict(window=(2, 2), schedule=((10, (4, 4)),))),
}


def make(name: str, ratio: float, max_downsample: int = 1):
    from retom_jax.merge import ReToM, ToDo, ToMe

    if name == "none":
        return None
    method, options = VARIANTS[name]
    if method == "todo":
        return ToDo(factor=2, max_downsample=max_downsample)
    if method == "tome":
        return ToMe(ratio=ratio, max_downsample=max_downsample)
    return ReToM(ratio=ratio, max_downsample=max_downsample, **options)


def generate(pipe, prompts, seeds, steps, guidance, merge, batch):
    rows, out = [], []
    for seed in seeds:
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                          merge=merge, output_type="np").images
            for prompt, image in zip(chunk, np.asarray(images)):
                color, _, background = shapes.parse_caption(prompt)
                image = (image * 255).round()
                out.append(image)
                rows.append(shapes.check_colors(image, color, background))
    return rows, np.stack(out)


def main(argv=None):
    from retom_jax.demo import build_demo_pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["tome", "todo", "retom"],
                   choices=sorted(VARIANTS))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--every", type=int, default=1, help="every k-th caption (1: all 90)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--max-downsample", type=int, default=1,
                   help="every variant merges at the levels downsampled at most this much "
                        "(the demo's attention is at 1 and, in its mid block, 2)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    pipe = build_demo_pipeline()
    guidance = pipe.resolve_guidance(None)
    prompts = shapes.all_captions()[::a.every]
    writer = common.ResultWriter(a.out, common.run_meta("retom_quality", argv, vars(a)))
    _, plain = generate(pipe, prompts, a.seeds, a.steps, guidance, None, a.batch)
    for ratio in a.ratios:
        for name in a.variants:
            if name == "todo" and ratio != a.ratios[0]:
                continue  # ToDo's factor, not the ratio, sets its reduction
            t0 = time.perf_counter()
            rows, images = generate(pipe, prompts, a.seeds, a.steps, guidance,
                                    make(name, ratio, a.max_downsample), a.batch)
            row = dict(variant=name, ratio=None if name == "todo" else ratio,
                       max_downsample=a.max_downsample,
                       psnr=psnr(images, plain), **summary(rows),
                       seconds=time.perf_counter() - t0)
            writer.add(row)
            print(f"{name:24s} ratio {row['ratio']}  PSNR {row['psnr']:.2f} dB  both "
                  f"{row['both']}/{row['n']}  ({row['seconds']:.0f} s)", flush=True)
    writer.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
