"""PNG plots from benchmark JSON files (needs matplotlib, which is optional).

    python benchmarks/plot.py results/unet_sd15_h100.json --out-dir results/plots
    python benchmarks/plot.py results/merge_overhead_h100.json --out-dir results/plots

From ``unet_speed`` files (JAX rows, and torch rows if present):

- ``speedup_<model>.png``: speed-up over no merging against image size, one panel per
  ratio, one line per method, the ideal (``FreeMerge``) dashed, tomesd (torch) dotted;
- ``ratio_<model>.png``: time per UNet call against ratio, one panel per image size,
  no merging as a horizontal line.

From ``merge_overhead`` files: ``overhead_<tokens>.png``: merge overhead as a percentage of
the attention time saved, against ratio, per method, with the 10% goal line.

Without matplotlib it prints a message and writes nothing (exit code 0); ``report.py``
gives the same numbers as Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

MISSING = ("matplotlib is not installed: plots skipped (it is optional; "
           "`pip install matplotlib` to draw them; report.py prints the tables without it)")

STYLE = {"tome": ("tab:red", "o"), "tome_md2": ("tab:pink", "o"), "retom": ("tab:blue", "s"),
         "retom_global": ("tab:cyan", "s"), "retom_cached": ("tab:green", "^"),
         "retom_cached_plan": ("tab:olive", "^"), "todo": ("tab:purple", "D"),
         "retom_cached_traced": ("tab:brown", "v"), "retom_cached_plan_traced": ("tab:gray", "v"),
         "retom_cached_static": ("tab:brown", "P"), "retom_cached_plan_static": ("tab:gray", "P")}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _load(paths):
    groups = defaultdict(list)
    for p in paths:
        data = json.loads(Path(p).read_text())
        kind = data.get("meta", {}).get("benchmark", "unet_speed")
        if kind == "torch_unet_speed":
            kind = "unet_speed"
        groups[kind].extend(r for r in data.get("rows", []) if r.get("median_ms") is not None)
    return groups


def _grid(plt, n, width=4.2, height=3.4):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat


def plot_unet(plt, rows, out_dir: Path) -> list[Path]:
    written = []
    jax_rows = [r for r in rows if r.get("framework", "jax") == "jax"]
    torch_rows = [r for r in rows if r.get("framework") == "torch"]
    for model in sorted({r["model"] for r in jax_rows}):
        mine = [r for r in jax_rows if r["model"] == model]
        theirs = [r for r in torch_rows if r["model"] == model]
        methods = [m for m in STYLE if any(r["method"] == m for r in mine)]
        ratios = sorted({r["ratio"] for r in mine if r["method"] in methods})
        sizes = sorted({r["height"] for r in mine})
        batch = sorted({r["batch"] for r in mine})[0]  # one batch per plot: the smallest
        mine = [r for r in mine if r["batch"] == batch]
        theirs = [r for r in theirs if r["batch"] == batch]

        # speed-up against image size, one panel per ratio
        if ratios:
            fig, axes = _grid(plt, len(ratios))
            for ax, ratio in zip(axes, ratios):
                for m in methods:
                    pts = sorted((r["height"], r.get("speedup")) for r in mine
                                 if r["method"] == m and abs(r["ratio"] - ratio) < 1e-9
                                 and r.get("speedup"))
                    if pts:
                        color, marker = STYLE[m]
                        ax.plot(*zip(*pts), color=color, marker=marker, label=m)
                # the ideal at ReToM's levels (the first attention level)
                levels = {r.get("max_downsample") for r in mine if r["method"] == "retom"}
                ideal = sorted((r["height"], r.get("speedup")) for r in mine
                               if r["method"] == "free" and abs(r["ratio"] - ratio) < 1e-9
                               and r.get("speedup")
                               and (not levels or r.get("max_downsample") in levels))
                if ideal:
                    ax.plot(*zip(*ideal), "k--", label="ideal (FreeMerge)")
                peer = sorted((r["height"], r.get("speedup")) for r in theirs
                              if r["method"] == "tome" and abs(r["ratio"] - ratio) < 1e-9
                              and r.get("speedup"))
                if peer:
                    ax.plot(*zip(*peer), ":", color="tab:red", marker="x", label="tomesd (torch)")
                ax.axhline(1.0, color="0.6", lw=0.8)
                ax.set_title(f"{model}, ratio {ratio:g}, batch {batch}")
                ax.set_xlabel("image size (px)")
                ax.set_ylabel("speed-up vs no merging")
                ax.set_xscale("log", base=2)
                ax.set_xticks(sizes, [str(s) for s in sizes])
                ax.minorticks_off()
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"speedup_{model}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)

        # time per call against ratio, one panel per size
        fig, axes = _grid(plt, len(sizes))
        for ax, size in zip(axes, sizes):
            at = [r for r in mine if r["height"] == size]
            none = [r["median_ms"] for r in at if r["method"] == "none"]
            if none:
                ax.axhline(none[0], color="k", lw=1, label="no merging")
            for m in methods + ["free"]:
                pts = sorted((r["ratio"], r["median_ms"]) for r in at if r["method"] == m)
                if pts:
                    if m == "free":
                        ax.plot(*zip(*pts), "k--", marker=".", label="ideal (FreeMerge)")
                    else:
                        color, marker = STYLE[m]
                        ax.plot(*zip(*pts), color=color, marker=marker, label=m)
            peer = sorted((r["ratio"], r["median_ms"]) for r in theirs
                          if r["height"] == size and r["method"] == "tome")
            if peer:
                ax.plot(*zip(*peer), ":", color="tab:red", marker="x", label="tomesd (torch)")
            tnone = [r["median_ms"] for r in theirs if r["height"] == size and r["method"] == "none"]
            if tnone:
                ax.axhline(tnone[0], color="tab:red", lw=0.8, ls="-.", label="torch, no merging")
            ax.set_title(f"{model}, {size}x{size}, batch {batch}")
            ax.set_xlabel("ratio (share of tokens merged)")
            ax.set_ylabel("ms per UNet call")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"ratio_{model}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_merge_overhead(plt, rows, out_dir: Path) -> list[Path]:
    written = []
    for tokens in sorted({r["tokens"] for r in rows}):
        at = [r for r in rows if r["tokens"] == tokens and r.get("overhead_pct_of_saving") is not None
              and r["method"] in STYLE and r["method"] != "todo"]
        if not at:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for m in [m for m in STYLE if any(r["method"] == m for r in at)]:
            pts = sorted((r["ratio"], r["overhead_pct_of_saving"]) for r in at if r["method"] == m)
            color, marker = STYLE[m]
            ax.plot(*zip(*pts), color=color, marker=marker, label=m)
        ax.axhline(10.0, color="k", ls="--", lw=1, label="goal: 10%")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_title(f"merge overhead, {tokens} tokens")
        ax.set_xlabel("ratio")
        ax.set_ylabel("overhead, % of attention time saved")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"overhead_{tokens}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="JSON files written by the benchmarks")
    p.add_argument("--out-dir", default="results/plots")
    args = p.parse_args(argv)
    plt = _pyplot()
    if plt is None:
        print(MISSING)
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = _load(args.files)
    written = []
    if groups.get("unet_speed"):
        written += plot_unet(plt, groups["unet_speed"], out_dir)
    if groups.get("merge_overhead"):
        written += plot_merge_overhead(plt, groups["merge_overhead"], out_dir)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("nothing to plot (no unet_speed or merge_overhead rows with timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
