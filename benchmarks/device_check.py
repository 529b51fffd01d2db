"""Check the programs the benchmarks time on this device: same UNet, same inputs, the
fast path (bf16, ``--attention auto``: cuDNN flash attention on a GPU) against a float32
XLA reference with the highest matmul precision, for plain and merged calls.

Run it first on a new device: a speed figure of a wrong program means nothing. Each row
is ``||fast - ref|| / ||ref||`` for one (model, size, method); bf16 lands around 1e-2.
For merging methods the plan is computed from bf16 tokens in one and float32 tokens in
the other, so near-tied choices may differ; ``same_plan`` says whether ReToM chose the
same representatives in both (from the first merged block's cache).

    python benchmarks/device_check.py --preset tiny --out results/device_check_tiny.json
    python benchmarks/device_check.py --preset cpu --out results/device_check_cpu.json   # ~2.5 min
    python benchmarks/device_check.py --preset gpu --out results/device_check_h100.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

PRESETS = {
    # the smoke test's: a tiny UNet, seconds on a CPU
    "tiny": dict(models=["sd15-tiny"], sizes=[128], methods=["none", "retom", "tome"]),
    # SD1.5's real architecture at 256 px: a few seconds a call on a CPU.
    "cpu": dict(models=["sd15"], sizes=[256], methods=["none", "retom", "tome"]),
    # two programs per row (fast and reference): about 10 SD1.5 compiles, a few minutes
    "gpu": dict(models=["sd15"], sizes=None,
                methods=["none", "retom", "retom_global", "tome", "todo"]),
}
GPU_SIZES = {"sd15": [512], "sd21": [768], "sdxl": [1024]}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--models", nargs="+", choices=sorted(common.MODELS))
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--methods", nargs="+")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--attention", choices=["auto", "cudnn", "xla", "splash"], default="auto",
                   help="the fast path's attention kernel (the reference always uses xla)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.models = args.models or preset["models"]
    args.methods = args.methods or preset["methods"]
    return args, preset


def representatives(state):
    """The first cached block's representatives, or None."""
    if not state:
        return None
    blocks = state["blocks"]
    first = next(iter(blocks.values()), None)  # keyed by block path, in call order
    return None if first is None else first.get("representatives")


def main(argv=None) -> int:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    args, preset = parse_args(sys.argv[1:] if argv is None else argv)
    meta = common.run_meta("device_check", argv, {k: v for k, v in vars(args).items()
                                                  if k != "out"}, script=__file__)
    writer = common.ResultWriter(args.out, meta)
    key = jax.random.key(1)

    for model in args.models:
        config = common.MODELS[model]
        fast = common.random_unet(config, jnp.bfloat16, attention=args.attention)
        ref = common.random_unet(config, jnp.float32, attention="xla")
        # the same (bf16-rounded) weights, so the rows measure the arithmetic alone
        ref.params = jax.tree.map(lambda a: a.astype(jnp.float32), fast.params)
        first = common.first_attention_level(fast.config)
        sizes = args.sizes or preset["sizes"] or GPU_SIZES.get(model, [512])
        for size in sizes:
            inputs = common.unet_inputs(config, args.batch, size, size, jnp.float32)
            for method in args.methods:
                merge = None if method == "none" else common.make_merge(method, args.ratio,
                                                                        first)
                stateful = getattr(merge, "cache_step", None) is not None
                if merge is not None and hasattr(merge, "cache_step") and not stateful:
                    merge = dataclasses.replace(merge, cache_step=0)  # to read the plan
                row = dict(model=model, height=size, width=size, batch=args.batch,
                           method=method, ratio=0.0 if merge is None else
                           common.ratio_for(method, args.ratio), attention=args.attention)
                try:
                    outs = []
                    for unet, dtype, precision in ((fast, jnp.bfloat16, None),
                                                   (ref, jnp.float32, "highest")):
                        t0 = time.perf_counter()
                        sample, t, ehs, added = jax.tree.map(
                            lambda a: a.astype(dtype) if a.dtype == jnp.float32 else a,
                            inputs)
                        state = None
                        if getattr(merge, "cache_step", None) is not None:
                            state = unet.init_merge_state(sample.shape, ehs.shape, merge, added)
                        with jax.default_matmul_precision(precision or "default"):
                            out = unet(sample, t, ehs, added, merge=merge, merge_state=state,
                                       key=key if merge is not None else None)
                        pred, new_state = out
                        outs.append((np.asarray(pred, np.float32), representatives(new_state)))
                        # progress: on a new device the first (compile + autotune) may be slow
                        print(f"  {model} {size}px {method} {jnp.dtype(dtype).name}: compiled "
                              f"and ran in {time.perf_counter() - t0:.1f} s", flush=True)
                    (got, rep_a), (want, rep_b) = outs
                    row["finite"] = bool(np.isfinite(got).all() and np.isfinite(want).all())
                    row["ref_rms"] = float(np.sqrt(np.mean(want ** 2)))
                    row["rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    if rep_a is not None:
                        row["same_plan"] = float(np.mean(np.asarray(rep_a) == np.asarray(rep_b)))
                except Exception as e:  # noqa: BLE001 - report and go on
                    row["error"] = common.short_error(e)
                writer.add(row)
                plan = f" same representatives {row['same_plan']:.1%}" if "same_plan" in row else ""
                print(f"{model} {size}px b{args.batch} {method}: rel_err "
                      f"{row.get('rel_err', float('nan')):.2e}{plan}"
                      + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
        del fast, ref
    writer.finish()
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
