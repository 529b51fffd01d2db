"""Does the demo model draw what it is told? Every caption of its training set (6 shape
colours x 5 other background colours x 3 shapes = 90 prompts) is generated and checked
with ``retom_jax.shapes.check_colors`` (the pixel test of
``tests/test_train.py::test_demo_draws_the_asked_colours``): the background colour is the
most common colour of the image's border (and covers > 60% of it), and the shape's colour
is the most common other colour of the middle (> 20% of it).

Reports, per seed, how many of the prompts get the background right, the shape's colour
right and both right, and which prompts fail; JSON with the counts and every prompt's
verdict.

    python benchmarks/demo_quality.py --merges none retom tome todo --seeds 0 1 \
        --out results/demo_quality.json
    python benchmarks/demo_quality.py --model demo-model --verbose

With several methods, each is also compared with the unmerged images of the same prompts
and seeds (PSNR, dB).
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

from retom_jax import shapes  # noqa: E402


def run(pipe, seeds, steps, guidance, merge, batch, step_cache=None):
    """``(rows, images)``: each caption's verdict per seed and the images (0-255).
    ``merge`` "fast": the --fast preset (its merge and step cache)."""
    from retom_jax.merge import from_options as merge_config
    from retom_jax.pipelines.step_cache import FAST

    if merge == "fast":
        method, step_cache = FAST.merge(1), FAST.step_cache
    else:
        method = merge_config(merge, 0.5) if merge != "none" else None
    prompts = shapes.all_captions()
    rows, out = [], []
    for seed in seeds:
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                          merge=method, step_cache=step_cache, output_type="np").images
            for prompt, image in zip(chunk, np.asarray(images)):
                color, _, background = shapes.parse_caption(prompt)
                image = (image * 255).round()
                out.append(image)
                rows.append({"prompt": prompt, "seed": seed, "merge": merge,
                             **shapes.check_colors(image, color, background)})
    return rows, np.stack(out)


def summary(rows):
    return {k: sum(r[k + "_ok"] for r in rows) for k in ("bg", "fg", "both")} | {"n": len(rows)}


def psnr(a, b):
    mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def main(argv=None):
    from retom_jax.demo import build_demo_pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="'demo' (the shipped one) or a folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None,
                   help="default: the model's (the demo's: 3)")
    p.add_argument("--merges", nargs="+", default=["none"],
                   choices=["none", "tome", "retom", "todo", "fast"],
                   help="methods at ratio 0.5 (ToDo: factor 2); PSNR is against 'none'")
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--step-cache", type=int, default=None, metavar="N",
                   help="a step cache of interval N for the merged runs and a 'none+cache' "
                        "run (PSNR stays against the uncached 'none')")
    p.add_argument("--step-cache-depth", type=int, default=1)
    p.add_argument("--verbose", action="store_true", help="list every failing prompt")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    pipe = build_demo_pipeline(path=None if a.model == "demo" else a.model)
    a.guidance = pipe.resolve_guidance(a.guidance)
    writer = common.ResultWriter(a.out, common.run_meta("demo_quality", argv, vars(a)))
    plain, summaries = None, {}
    from retom_jax.pipelines.step_cache import parse_step_cache

    cache = parse_step_cache(a.step_cache, a.step_cache_depth)
    runs = list(dict.fromkeys(["none", *a.merges]) if len(a.merges) > 1 else a.merges)
    if cache is not None:  # the uncached 'none' stays the reference
        runs = ["none"] * ("none" not in runs) + runs + [
            m + "+cache" for m in runs if m != "fast"] * 1
    for merge in runs:
        t0 = time.perf_counter()
        base = merge.removesuffix("+cache")
        rows, images = run(pipe, a.seeds, a.steps, a.guidance, base, a.batch,
                           cache if merge.endswith("+cache") else None)
        for r in rows:
            r["merge"] = merge
        s = summary(rows)
        if merge == "none":
            plain = images
        elif plain is not None:
            s["psnr_vs_none"] = psnr(images, plain)
        summaries[merge] = s
        extra = f", PSNR vs none {s['psnr_vs_none']:.1f} dB" if "psnr_vs_none" in s else ""
        print(f"{a.model} {merge} ({a.steps} steps, guidance {a.guidance}, seeds {a.seeds}): "
              f"background {s['bg']}/{s['n']}, shape colour {s['fg']}/{s['n']}, both "
              f"{s['both']}/{s['n']}{extra}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        for r in rows:
            writer.add(r)
            if a.verbose and not r["both_ok"]:
                print(f"  seed {r['seed']}: {r['prompt']!r}: got a {r['fg']} shape on "
                      f"{r['bg']}")
    writer.finish(summary=summaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
