"""Scaling across devices: images per second, compile time and per-device memory against
the mesh shape (``retom_jax.sharding``).

Each row is one mesh over the first ``k`` devices (``data=k`` for the data-parallel
sweep 1, 2, 4 ... all devices, then the ``--meshes`` given, e.g. ``data=4,fsdp=2``). Per
row, with ``--images-per-device`` images per batch shard:

* **pipeline**: the whole sampling program (prompts in, images on the host): compile
  seconds, the median of ``--repeats`` timed calls, ``images_per_s``, and the program's
  per-device memory from ``compiled.memory_analysis()`` (arguments + outputs + scratch);
* **unet**: one UNet call on the mesh (batch ``2 x images``, guidance's), median ms and
  its per-device memory.

``dp_efficiency`` = (images/s on k devices / k) / (images/s on 1 device), for the
``data=k`` rows. On a CPU with host devices (``XLA_FLAGS=--xla_force_host_platform_
device_count=8``) every "device" shares the same cores: the figures are a smoke test of
the machinery, not a speed.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python benchmarks/scaling.py --preset cpu --out results/scaling_cpu.json
    python benchmarks/scaling.py --preset gpu --out results/scaling_sd15.json  # every chip
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from retom_jax import sharding  # noqa: E402

PRESETS = {
    "cpu": dict(model="demo", size=64, steps=2, repeats=2, images_per_device=1,
                dtype="fp32", meshes=["data=4,fsdp=2", "data=2,fsdp=2,spatial=2"],
                min_shard_size=256),
    "gpu": dict(model="sd15", size=512, steps=20, repeats=5, images_per_device=1,
                dtype="bf16", meshes=["fsdp=2", "spatial=2"], min_shard_size=None),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--model", choices=["demo", "sd15", "sd21", "sdxl"])
    p.add_argument("--size", type=int, help="image size in pixels (square)")
    p.add_argument("--steps", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--images-per-device", type=int)
    p.add_argument("--dtype")
    p.add_argument("--meshes", nargs="*", help="extra meshes, e.g. data=4,fsdp=2 spatial=8")
    p.add_argument("--no-sweep", action="store_true", help="skip the data=1,2,4... sweep")
    p.add_argument("--merge", choices=["none", "tome", "retom", "todo"], default="none")
    p.add_argument("--min-shard-size", type=int)
    p.add_argument("--skip-unet", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def build(model, dtype):
    if model == "demo":
        from retom_jax.demo import build_demo_pipeline

        return build_demo_pipeline(dtype)
    import pipeline_speed

    return pipeline_speed.random_pipeline(model, dtype)


def sweep(n):
    k, out = 1, []
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return {}
    if m is None:
        return {}
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return {"argument_mb": m.argument_size_in_bytes / 1e6, "temp_mb": m.temp_size_in_bytes / 1e6,
            "total_mb": total / 1e6}


def run_row(args, mesh_text, devices, dtype, merge):
    sizes = sharding.parse_mesh(mesh_text)
    sizes.setdefault("data", -1)
    mesh = sharding.make_mesh(**sizes, devices=devices)
    pipe = build(args.model, dtype)
    pipe.shard(mesh)
    images = args.images_per_device * sharding.batch_shards(mesh)
    prompts = [f"a photo of a cat {i}" for i in range(images)]
    kw = dict(num_inference_steps=args.steps, height=args.size, width=args.size,
              output_type="np", merge=merge)
    first = pipe(prompts, seed=0, **kw)
    compiled = next(v for k, v in pipe._compiled.items() if k[0] == "sample")
    count = pipe.compile_count
    times = [pipe(prompts, seed=i + 1, **kw).run_seconds for i in range(args.repeats)]
    med = statistics.median(times)
    row = {"mesh": mesh_text, "devices": len(devices), "shape": sharding.mesh_shape(mesh),
           "images": images, "compile_s": first.compile_seconds, "median_s": med,
           "images_per_s": images / med, "recompiles": pipe.compile_count - count,
           "pipeline_memory": memory(compiled)}
    if not args.skip_unet:
        unet = pipe.unet
        h = args.size // pipe.vae_scale_factor
        rows = 2 * images
        x = jax.device_put(jnp.zeros((rows, unet.config.in_channels, h, h), jnp.float32),
                           NamedSharding(mesh, sharding.latent_spec(mesh)))
        ctx = pipe.encode_prompt(prompts, height=args.size, width=args.size)
        ctx = {k: jax.device_put(v, NamedSharding(mesh, sharding.logical_spec(
            ("batch",) + (None,) * (v.ndim - 1), mesh))) for k, v in ctx.items()}
        ehs = ctx.pop("encoder_hidden_states")
        added = ctx or None
        fn = jax.jit(lambda p, x, e, a: unet.apply(p, x, jnp.float32(500.0), e, a, merge=merge))
        compiled_unet, info = common.compile_jitted(fn, unet.params, x, ehs, added)
        t = common.time_calls(compiled_unet, [(unet.params, x, ehs, added)], warmup=1,
                              iters=max(args.repeats, 3))
        row["unet"] = {"compile_s": info["compile_s"], "median_ms": t["median_ms"],
                       "memory": memory(compiled_unet)}
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.min_shard_size is not None:
        sharding.MIN_SHARD_SIZE = args.min_shard_size
    dtype = common.parse_dtype(args.dtype)
    devices = jax.devices()
    first_level = 2 if common.family(args.model) == "sdxl" else 1
    merge = None if args.merge == "none" else common.make_merge(args.merge, 0.5, first_level)
    settings = {k: getattr(args, k) for k in ("model", "size", "steps", "repeats",
                                              "images_per_device", "dtype", "merge")}
    writer = common.ResultWriter(args.out, common.run_meta("scaling", argv, settings,
                                                           script=__file__))
    plan = [] if args.no_sweep else [(f"data={k}", devices[:k]) for k in sweep(len(devices))]
    plan += [(m, devices) for m in args.meshes or []]
    base = None
    for mesh_text, devs in plan:
        try:
            row = run_row(args, mesh_text, devs, dtype, merge)
        except Exception as e:  # noqa: BLE001 - a row that fails is reported, others run
            row = {"mesh": mesh_text, "devices": len(devs), "error": common.short_error(e)}
        if row.get("images_per_s") and mesh_text == "data=1":
            base = row["images_per_s"]
        if base and row.get("images_per_s") and mesh_text == f"data={len(devs)}":
            row["dp_efficiency"] = row["images_per_s"] / len(devs) / base
        writer.add(row)
        mem = row.get("pipeline_memory", {}).get("total_mb")
        print(f"{mesh_text:>28}: " + (row["error"] if "error" in row else
              f"{row['images_per_s']:.3f} img/s, compile {row['compile_s']:.1f} s, "
              f"{mem if mem is None else round(mem, 1)} MB/device"), flush=True)
    writer.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
