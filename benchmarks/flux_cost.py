"""XLA cost of one Flux (or SD3.5) transformer call per merge method (compiled on the CPU,
never run).

The Flux.1-dev architecture (19 double + 38 single blocks, 3072 channels, guidance
embedding) at ``--size`` px (1024: a 64x64 packed latent, 4096 image tokens) with
``--text`` T5 tokens (512), batch ``--batch``. Parameters are abstract
(``jax.ShapeDtypeStruct``): no 12B weights are made. The attention's query chunking is
switched off so that ``cost_analysis()`` counts every attention FLOP (a chunked
``lax.map`` body is counted once). FLOPs are per transformer call; a 28-step image costs
28 (x2 with true CFG) calls::

    python benchmarks/flux_cost.py --out docs/flux_cost_cpu.json
    python benchmarks/flux_cost.py --model sd35-medium --out docs/sd35_cost_cpu.json

``--model sd35-medium``: the SD3.5-medium MMDiT (24 blocks, 1536 channels, dual attention
in blocks 0-12, qk-norm) with 333 text tokens (77 CLIP + 256 T5).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from retom_jax.analysis.tpu_transformers import FLUX_TINY as TINY  # noqa: E402
from retom_jax.analysis.tpu_transformers import SD3_TINY  # noqa: E402
from retom_jax.analysis.tpu_transformers import transformer_methods as methods  # noqa: E402
from retom_jax.models.flux import FLUX_DEV  # noqa: E402 - the real architectures
from retom_jax.models.sd3 import SD35_MEDIUM  # noqa: E402


def sd3_cost(model, merge, batch, grid, text):
    cfg, spec = model.config, jax.ShapeDtypeStruct
    p = cfg.patch_size
    args = (spec((batch, cfg.in_channels, grid[0] * p, grid[1] * p), model.dtype),
            spec((batch, text, cfg.joint_attention_dim), model.dtype),
            spec((batch, cfg.pooled_projection_dim), model.dtype), spec((batch,), jnp.float32))
    fn = jax.jit(lambda prm, *a: model.apply(prm, *a, merge=merge).sample)
    return compiled_cost(fn, model.params, args)


def compiled_cost(fn, params, args):
    t0 = time.perf_counter()
    compiled = fn.lower(params, *args).compile()
    info = compiled.cost_analysis()
    info = info[0] if isinstance(info, (list, tuple)) else info
    return {"flops": float(info["flops"]), "bytes": float(info["bytes accessed"]),
            "compile_s": time.perf_counter() - t0}


def cost(model, merge, batch, grid, text):
    from retom_jax.models.flux import image_ids
    cfg, spec = model.config, jax.ShapeDtypeStruct
    n = grid[0] * grid[1]
    args = (spec((batch, n, cfg.in_channels), model.dtype),
            spec((batch, text, cfg.joint_attention_dim), model.dtype),
            spec((batch, cfg.pooled_projection_dim), model.dtype), spec((batch,), jnp.float32),
            jnp.asarray(image_ids(*grid)), jnp.zeros((text, 3), jnp.float32),
            spec((batch,), jnp.float32))
    fn = jax.jit(lambda p, *a: model.apply(p, *a, merge=merge, grid=grid).sample)
    return compiled_cost(fn, model.params, args)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--model", choices=["flux-dev", "sd35-medium"], default="flux-dev")
    p.add_argument("--text", type=int, default=None,
                   help="text tokens (default: 512 T5 for Flux, 77 CLIP + 256 T5 for SD3.5)")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--methods", nargs="+", default=list(methods(0.5)))
    p.add_argument("--tiny", action="store_true", help="a tiny architecture (smoke test)")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from retom_jax.models import attention
    from retom_jax.models.flux import abstract_flux_transformer
    from retom_jax.models.sd3 import abstract_sd3_transformer

    attention.XLA_CHUNK_BYTES = math.inf  # count every attention FLOP (see the docstring)
    sd3 = args.model == "sd35-medium"
    if args.text is None:
        args.text = 333 if sd3 else 512
    if sd3:
        model = abstract_sd3_transformer(SD3_TINY if args.tiny else SD35_MEDIUM,
                                         dtype=args.dtype)
        measure = sd3_cost
    else:
        model = abstract_flux_transformer(TINY if args.tiny else FLUX_DEV, dtype=args.dtype)
        measure = cost
    side = args.size // 16  # VAE /8, then 2x2 patches
    grid = (side, side)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    writer = common.ResultWriter(args.out, common.run_meta("flux_cost", argv, settings,
                                                           script=__file__))
    table = methods(args.ratio)
    rows = {}
    for name in ["none"] + [m for m in args.methods if m != "none"]:
        row = dict(method=name, merge=repr(table[name]), size=args.size, batch=args.batch,
                   text=args.text, ratio=args.ratio,
                   model=args.model, **measure(model, table[name], args.batch, grid, args.text))
        row["flops_vs_none"] = row["flops"] / (rows.get("none") or row)["flops"]
        rows[name] = writer.add(row)
        print(f"{name:12s} {row['flops'] / 1e12:9.2f} TFLOP  x{row['flops_vs_none']:.3f}  "
              f"(compiled in {row['compile_s']:.0f} s)", flush=True)
    writer.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
