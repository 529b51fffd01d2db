"""XLA cost of one UNet call per merge method, relative to the zero-overhead probe.

One SD1.5-shaped UNet call (``--size`` px, ``--batch`` images, float32) is lowered and
compiled on the CPU for each method, never run: parameters are abstract (shapes only), so
no weights are made. ``cost_analysis()`` gives the FLOPs and the bytes accessed; the
ratios are to the ``free`` probe (`common.FreeMerge`: slicing instead of merging, the
zero-overhead limit at the same attention sizes)::

    python benchmarks/merge_cost.py --out results/merge_cost_cpu.json   # ~1 min on 2 cores
    python benchmarks/merge_cost.py --model sdxl --size 1024 --max-downsample 4 \
        --methods free none retom tome todo retom_kv --out results/merge_cost_sdxl_md4.json
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ["none", "free", "retom", "tome"]


def cost(unet, merge, batch, size, method):
    spec = jax.ShapeDtypeStruct
    sample, _, ehs, added = jax.eval_shape(lambda: common.unet_inputs(
        unet.config, batch, size, size, jnp.float32))  # SDXL: its added conditioning too
    key = jax.eval_shape(lambda: jax.random.key(0))
    params = jax.tree.map(lambda a: spec(a.shape, a.dtype), unet.params)
    needs_key = method.startswith("tome")
    fn = jax.jit(lambda p, s, e, a, k: unet.apply(p, s, jnp.float32(500.0), e, a, merge=merge,
                                                  key=k if needs_key else None))
    t0 = time.perf_counter()
    compiled = fn.lower(params, sample, ehs, added, key).compile()
    info = compiled.cost_analysis()
    info = info[0] if isinstance(info, (list, tuple)) else info
    return {"flops": float(info["flops"]), "bytes": float(info["bytes accessed"]),
            "compile_s": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(common.MODELS), default="sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=list(common.METHODS))
    p.add_argument("--max-downsample", type=int, default=None,
                   help="merge at every level downsampled at most this much, all methods "
                        "(default: each method's own; SDXL's 1280-channel level is 4)")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from flax import nnx

    from retom_jax.models import weights
    from retom_jax.models.unet import UNet, UNet2DConditionModel

    config = common.unet_config(common.MODELS[args.model])
    module = weights.abstract_module(lambda rngs: UNet2DConditionModel(
        config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs))
    graphdef, params = nnx.split(module)  # shapes only: nothing is initialised
    unet = UNet(config, graphdef, params, jnp.float32)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    writer = common.ResultWriter(args.out, common.run_meta("merge_cost", argv, settings,
                                                           script=__file__))
    first = common.first_attention_level(config)
    rows = {}
    for method in ["free"] + [m for m in args.methods if m != "free"]:  # the probe first
        merge = common.make_merge(method, args.ratio, first)
        if merge is not None and args.max_downsample is not None:
            merge = dataclasses.replace(merge, max_downsample=args.max_downsample)
        rows[method] = row = dict(method=method, model=args.model, size=args.size,
                                  batch=args.batch, ratio=args.ratio,
                                  max_downsample=getattr(merge, "max_downsample", None),
                                  **cost(unet, merge, args.batch, args.size, method))
        row["flops_vs_free"] = row["flops"] / rows["free"]["flops"]
        row["bytes_vs_free"] = row["bytes"] / rows["free"]["bytes"]
        writer.add(row)
        print(f"{method:20s} flops x{row['flops_vs_free']:.4f}  bytes "
              f"x{row['bytes_vs_free']:.4f}  (compiled in {row['compile_s']:.1f} s)", flush=True)
    writer.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
