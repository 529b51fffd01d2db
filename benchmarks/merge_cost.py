"""XLA cost of one UNet call per merge method, relative to the zero-overhead probe.

One SD1.5-shaped UNet call (``--size`` px, ``--batch`` images, float32) is lowered and
compiled on the CPU for each method, never run: parameters are abstract (shapes only), so
no weights are made. ``cost_analysis()`` gives the FLOPs and the bytes accessed; the
ratios are to the ``free`` probe (`common.FreeMerge`: slicing instead of merging, the
zero-overhead limit at the same attention sizes)::

    python benchmarks/merge_cost.py --out merge_cost.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ["none", "free", "retom", "tome"]


def cost(unet, merge, batch, size, method):
    c = unet.config
    spec = jax.ShapeDtypeStruct
    sample = spec((batch, c.in_channels, size // 8, size // 8), jnp.float32)
    ehs = spec((batch, common.TEXT_TOKENS, c.cross_attention_dim[0]), jnp.float32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    params = jax.tree.map(lambda a: spec(a.shape, a.dtype), unet.params)
    needs_key = method.startswith("tome")
    fn = jax.jit(lambda p, s, e, k: unet.apply(p, s, jnp.float32(500.0), e, merge=merge,
                                               key=k if needs_key else None))
    t0 = time.perf_counter()
    compiled = fn.lower(params, sample, ehs, key).compile()
    info = compiled.cost_analysis()
    info = info[0] if isinstance(info, (list, tuple)) else info
    return {"flops": float(info["flops"]), "bytes": float(info["bytes accessed"]),
            "compile_s": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--out")
    args = p.parse_args(argv)
    from retom_jax import weights
    from retom_jax.unet import UNet, UNet2DConditionModel, UNetConfig
    from flax import nnx

    config = UNetConfig.from_dict(dict(common.SD15))
    module = weights.abstract_module(lambda rngs: UNet2DConditionModel(
        config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs))
    graphdef, params = nnx.split(module)
    unet = UNet(config, graphdef, params, jnp.float32)
    rows = {}
    for method in args.methods:
        merge = common.make_merge(method, args.ratio) if method != "none" else None
        rows[method] = cost(unet, merge, args.batch, args.size, method)
        print(method, rows[method], flush=True)
    free = rows.get("free")
    if free:
        for method, row in rows.items():
            row["flops_vs_free"] = row["flops"] / free["flops"]
            row["bytes_vs_free"] = row["bytes"] / free["bytes"]
            print(f"{method:8s} flops x{row['flops_vs_free']:.4f}  bytes x{row['bytes_vs_free']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
