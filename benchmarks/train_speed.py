"""One training step (forward, backward, AdamW update), with and without token merging
on the forward pass (issue 14).

For each model, size, training kind (``full`` fine-tuning or ``lora``) and merge method:
the jitted step of ``retom_jax.train.Trainer`` (buffers donated) is lowered and compiled
apart (``compile_s``, with XLA's per-device memory for the program: ``xla_temp_gb``
scratch and ``xla_total_gb`` arguments + outputs + scratch, from
``compiled.memory_analysis()``), then stepped ``--warmup`` times and timed over
``--iters`` synchronised steps (median, 10th and 90th percentiles). ``speedup`` is the
``none`` row's median over the row's, for the same model, size and kind.

    python benchmarks/train_speed.py --preset cpu --out results/train_cpu.json    # CPU smoke
    python benchmarks/train_speed.py --preset gpu --out results/train_gpu.json    # SD1.5 512, SDXL 1024
    python benchmarks/train_speed.py --mesh data=4,fsdp=2 --batch 8 ...           # on a device mesh

With ``--mesh`` the step runs as ``retom-jax train --mesh`` runs it (batch over data x
fsdp, parameters and optimizer state over fsdp); XLA's memory figures are then per device.

Random weights at the real architectures (``--weights`` for a real UNet folder); latents
and text states are random (data loading is not part of the step).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from common import jax, jnp, np  # noqa: E402

from retom_jax.demo import DEMO_UNET  # noqa: E402

MODELS = {**common.MODELS, "demo": DEMO_UNET}
PRESETS = {
    "cpu": dict(models=["demo"], sizes={"demo": [64]}, batch=2, kinds=["full", "lora"],
                methods=["none", "tome", "retom", "todo"], dtype="fp32", iters=3, warmup=1,
                vae_factor={"demo": 4}),
    "gpu": dict(models=["sd15", "sdxl"], sizes={"sd15": [512], "sdxl": [1024]}, batch=4,
                kinds=["lora", "full"], methods=["none", "tome", "retom", "todo"],
                dtype="bf16", iters=10, warmup=3, vae_factor={}),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS))
    p.add_argument("--sizes", type=int, nargs="+", help="image sizes (pixels, square)")
    p.add_argument("--batch", type=int)
    p.add_argument("--kinds", nargs="+", choices=["full", "lora"])
    p.add_argument("--methods", nargs="+", choices=["none", "tome", "retom", "todo"])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--dtype", help="fp32 (cpu default) or bf16 (gpu default)")
    p.add_argument("--master-fp32", action="store_true",
                   help="full fine-tuning of bf16 weights through a float32 master copy")
    p.add_argument("--iters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--weights", help="a diffusers UNet (or pipeline) folder instead of random weights")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; no new row is started after it")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="train on a device mesh, e.g. data=4,fsdp=2 (--batch a multiple of "
                        "data x fsdp); data takes the devices left")
    p.add_argument("--out", help="JSON file (rewritten after each row)")
    args = p.parse_args(argv)
    if args.mesh is not None:
        from retom_jax.sharding import parse_mesh

        try:
            args.mesh = parse_mesh(args.mesh)
        except ValueError as e:
            p.error(f"--mesh: {e}")
    preset = PRESETS[args.preset]
    for k in ("models", "batch", "kinds", "methods", "dtype", "iters", "warmup"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    args.vae_factor = preset["vae_factor"]
    args.sizes_for = {m: args.sizes or preset["sizes"].get(m) or
                      PRESETS["gpu"]["sizes"].get(m, [512]) for m in args.models}
    if args.lora_rank < 1:
        p.error(f"--lora-rank must be >= 1, got {args.lora_rank}")
    return args


def batch_for(unet, config, batch, size, factor, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    lat = size // factor
    out = {"latents": jax.random.normal(k[0], (batch, unet.config.in_channels, lat, lat)),
           "encoder_hidden_states": jax.random.normal(
               k[1], (batch, common.TEXT_TOKENS, unet.config.cross_attention_dim[0]), dtype)}
    te = common.text_embeds_dim(config)
    if te is not None:
        out["added_cond_kwargs"] = {
            "text_embeds": jax.random.normal(k[2], (batch, te), dtype),
            "time_ids": jnp.tile(jnp.array([[size, size, 0, 0, size, size]], jnp.float32),
                                 (batch, 1))}
    return out


def measure(trainer, batch, args):
    """Compile the step apart, then time synchronised steps; the state is threaded through
    (its buffers are donated)."""
    state = trainer.init(jax.random.key(0))
    key = jax.random.key(1)
    compiled, info = common.compile_jitted(trainer, state, batch, key)  # trainer.lower(...)
    if trainer.mesh is not None:  # the compiled step takes its arguments placed on the mesh
        from retom_jax.train.trainer import replicated

        batch, key = trainer.place_batch(batch), replicated(key, trainer.mesh)
    frozen = trainer.frozen()
    times, loss = [], None
    for i in range(args.warmup + args.iters):
        t = time.perf_counter()
        state, metrics = compiled(state, frozen, batch, key)
        loss = float(jax.block_until_ready(metrics["loss"]))
        if i >= args.warmup:
            times.append((time.perf_counter() - t) * 1e3)
    info.update(median_ms=statistics.median(times), p10_ms=common.percentile(times, 10),
                p90_ms=common.percentile(times, 90), iters=args.iters, loss=loss,
                finite=bool(np.isfinite(loss)), peak_gb=common.peak_memory_gb())
    return info


def main(argv=None) -> int:
    from retom_jax.schedulers import from_config
    from retom_jax.demo import SD15_SCHEDULER
    from retom_jax.train.trainer import TrainConfig, Trainer

    args = parse_args(sys.argv[1:] if argv is None else argv)
    dtype = common.parse_dtype(args.dtype)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "sizes_for")}
    settings["sizes"] = args.sizes_for
    writer = common.ResultWriter(args.out, common.run_meta("train_speed", argv, settings,
                                                           script=__file__))
    budget = common.Budget(args.time_budget)
    ac = from_config(SD15_SCHEDULER).alphas_cumprod()
    mesh = None
    if args.mesh is not None:
        from retom_jax.sharding import make_mesh

        mesh = make_mesh(**{"data": -1, **args.mesh})
        print(f"mesh {dict(mesh.shape)} over {mesh.size} devices", flush=True)
    for model in args.models:
        config = MODELS[model]
        try:
            if args.weights:
                from retom_jax import load_unet
                unet = load_unet(args.weights, dtype)
            else:
                unet = common.random_unet(config, dtype)
        except Exception as e:  # noqa: BLE001
            writer.add(dict(model=model, error=f"could not build the UNet: {common.short_error(e)}"))
            continue
        first = common.first_attention_level(config)
        factor = args.vae_factor.get(model, 8)
        for size in args.sizes_for[model]:
            batch = batch_for(unet, config, args.batch, size, factor, dtype)
            for kind in args.kinds:
                base = None
                for method in ["none"] + [m for m in args.methods if m != "none"]:
                    if budget.exhausted():
                        writer.finish(stopped_by_budget=True)
                        return 0
                    row = dict(model=model, size=size, batch=args.batch, kind=kind,
                               method=method, ratio=None if method in ("none", "todo")
                               else args.ratio, dtype=common.dtype_name(dtype),
                               master_fp32=args.master_fp32 and kind == "full",
                               mesh=None if mesh is None else dict(mesh.shape))
                    merge = common.make_merge(method, args.ratio, first)
                    tc = TrainConfig(steps=1000, batch_size=args.batch,
                                     lora_rank=args.lora_rank if kind == "lora" else None,
                                     master_fp32=row["master_fp32"])
                    try:
                        trainer = Trainer(unet, ac, tc, merge=merge, mesh=mesh)
                        row.update(measure(trainer, batch, args))
                    except Exception as e:  # noqa: BLE001 - one failed row, not the run
                        row["error"] = common.short_error(e)
                    if method == "none" and "median_ms" in row:
                        base = row["median_ms"]
                    if base and "median_ms" in row:
                        row["speedup"] = base / row["median_ms"]
                    writer.add(row)
                    print(f"{model} {size}px {kind:4s} {method:6s} "
                          + (f"{row['median_ms']:9.1f} ms  compile {row['compile_s']:.1f} s  "
                             f"xla {row['xla_total_gb'] or 0:.3f} GB"
                             if "median_ms" in row else f"error: {row['error']}"), flush=True)
    writer.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
