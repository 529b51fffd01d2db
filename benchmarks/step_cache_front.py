"""Quality beside speed for step caching and merging on the demo model: one grid over
step-cache intervals, merge methods and ratios, each point with its PSNR to the unmerged,
uncached images, its caption checks (``shapes.check_colors``) and XLA's FLOPs per image
for the whole call (``retom_jax.analysis.cost``, the count ``retom-jax bench cost``
makes).

    python benchmarks/step_cache_front.py --out docs/step_cache_front.json
    python benchmarks/step_cache_front.py --out docs/step_cache_front.json --cost \
        --plot docs/step_cache_front.png   # adds the FLOPs and draws the front

A subset of the 90 captions (``--captions``, spread over all colours and shapes) keeps the
grid affordable on a CPU; ``benchmarks/demo_quality.py --step-cache N`` checks all 180
(90 captions x 2 seeds) for the points picked from the front. A finished point is not run
again when the output file already has it (a run cut short resumes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import numpy as np  # noqa: E402

from retom_jax import shapes  # noqa: E402


def grid(methods, ratios, intervals):
    """``[(method, ratio, interval)]``: the unmerged points first (ratio 0), ToDo at its
    fixed factor only."""
    out = [("none", 0.0, n) for n in intervals]
    for method in methods:
        rs = [common.ratio_for(method, 0.5)] if method == "todo" else ratios
        out += [(method, r, n) for r in rs for n in intervals]
    return out


def psnr(a, b):
    mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def main(argv=None):
    import retom_jax as rj
    from retom_jax.demo import build_demo_pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--captions", type=int, default=15, help="how many of the 90 captions")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--methods", nargs="+", default=["tome", "retom", "todo"])
    p.add_argument("--out", required=True)
    p.add_argument("--cost", action="store_true", help="add XLA's FLOPs per image")
    p.add_argument("--plot", help="PNG of FLOPs per image against PSNR (needs --cost)")
    a = p.parse_args(argv)
    path = Path(a.out)
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["method"], r["ratio"], r["interval"]): r for r in old}
    writer = common.ResultWriter(a.out, common.run_meta("step_cache_front", argv, vars(a)))
    pipe = build_demo_pipeline()
    guidance = pipe.resolve_guidance(None)
    captions = shapes.all_captions()  # a stride prime to 2, 3 and 5: every colour and shape
    prompts = [captions[i * 7 % len(captions)] for i in range(a.captions)]
    plain = None
    for method, ratio, interval in grid(a.methods, a.ratios, a.intervals):
        row = done.get((method, ratio, interval))
        if row is None or plain is None:
            merge = None if method == "none" else common.make_merge(method, ratio)
            cache = rj.StepCache(interval, a.depth) if interval > 1 else None
            t0 = time.perf_counter()
            images = np.concatenate([np.asarray(pipe(
                prompts, num_inference_steps=a.steps, guidance_scale=guidance, seed=seed,
                merge=merge, step_cache=cache, output_type="np").images) * 255
                for seed in a.seeds]).round()
            captions = [shapes.check_colors(img, *shapes.parse_caption(pr)[::2])["both_ok"]
                        for img, pr in zip(images, prompts * len(a.seeds))]
            if plain is None:
                plain = images
            row = dict(method=method, ratio=ratio, interval=interval, depth=a.depth,
                       steps=a.steps, images=len(images), captions_ok=int(sum(captions)),
                       psnr=psnr(images, plain) if method != "none" or interval > 1 else None,
                       seconds=time.perf_counter() - t0)
            print(json.dumps(row), flush=True)
        writer.add(row)
    if a.cost:
        add_cost(writer.rows, a.steps, a.depth)
        writer.flush()
    writer.finish()
    if a.plot:
        plot(writer.rows, a.plot)
    return 0


def add_cost(rows, steps, depth):
    """Each row's whole-call FLOPs per image on the demo architecture (64 px)."""
    import retom_jax as rj
    from retom_jax.analysis import cost

    pipe, memo = cost.abstract_pipeline("demo"), {}
    base = None
    for r in rows:
        merge = None if r["method"] == "none" else common.make_merge(r["method"], r["ratio"])
        cache = rj.StepCache(r["interval"], depth) if r["interval"] > 1 else None
        programs = cost.pipeline_cost(pipe, height=64, width=64, steps=steps, merge=merge,
                                      step_cache=cache, memo=memo)
        r["gflop_per_image"], r["gbytes_per_image"] = cost.per_image(programs, 1)
        if r["method"] == "none" and r["interval"] == 1:
            base = r["gflop_per_image"]
    for r in rows:
        r["flop_vs_base"] = r["gflop_per_image"] / base


def plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"none": "k", "tome": "tab:blue", "retom": "tab:red", "todo": "tab:green"}
    for (method, ratio) in dict.fromkeys((r["method"], r["ratio"]) for r in rows):
        pts = sorted((r["flop_vs_base"], r["psnr"] or 60.0, r["interval"]) for r in rows
                     if (r["method"], r["ratio"]) == (method, ratio))
        label = "no merging" if method == "none" else f"{method} {ratio:g}"
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", label=label,
                color=styles.get(method, "gray"), alpha=0.35 + 0.65 * (ratio or 1.0))
        for x, y, n in pts:
            ax.annotate(str(n), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.axhline(30, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("FLOPs per image / unmerged uncached (XLA count, whole call)")
    ax.set_ylabel("PSNR to unmerged uncached (dB; 60 = identical)")
    ax.set_title("Demo model: step cache interval (labels) x merging")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
