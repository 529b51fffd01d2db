"""Seconds per image, end to end: prompt in, decoded image out (``retom_jax.pipeline``).

Each row is one pipeline configuration (model, size, steps, images, merge method). The
first call compiles the sampling program (its ``compile_seconds`` is ``compile_s``; the
call's total wall time is ``first_call_s``); then ``--repeats`` calls (at least 10 by
default) are timed with a host clock around the whole call (the pipeline blocks until
the images are on the host) and we report the median, and ``s_per_image`` = median /
images. Classifier-free guidance is on (``guidance_scale`` 7.5: the UNet sees a batch of
2 per image), ``output_type="np"`` (no PIL conversion in the timing).

Models: ``demo`` (the tiny random pipeline of ``retom_jax.demo``: CPU smoke), ``sd15`` /
``sdxl`` (random weights at the real architectures: CLIP text encoder(s), UNet, VAE; a
small demo tokenizer, whose ids are valid for the real vocabularies), or ``--weights PATH``
(a diffusers pipeline folder: real weights, real tokenizer). ``--compile-only`` compiles
each row's program (``pipe.compile``) and samples nothing: the whole-pipeline compile time
(``compile_s``; ``first_call_s`` adds the text encoder's run and its small programs).

    python benchmarks/pipeline_speed.py --preset tiny --out results/pipeline_tiny.json
    python benchmarks/pipeline_speed.py --preset gpu --models sd15 --out results/pipeline_sd15_h100.json
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

METHODS = ("none", "tome", "retom", "retom_cached", "todo")
PRESETS = {
    "tiny": dict(models=["demo"], sizes={"demo": [64]}, steps=3, repeats=10, warmup=1,
                 dtype="fp32", ratios=[0.5], methods=["none", "retom"]),
    "gpu": dict(models=["sd15"], sizes={"sd15": [512, 1024], "sdxl": [1024]}, steps=30,
                repeats=10, warmup=1, dtype="bf16", ratios=[0.5],
                methods=["none", "tome", "retom", "retom_cached", "todo"]),
}

# The real architectures of the other components (diffusers / transformers configs).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu")
CLIP_BIGG = dict(architecture="CLIPTextModelWithProjection", hidden_size=1280,
                 intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def random_pipeline(model: str, dtype):
    """A pipeline with random weights at the real architecture of ``model``."""
    from flax import nnx

    from retom_jax.models.clip import TextEncoder, TextEncoderConfig, build_text_encoder
    from retom_jax.demo import SD15_SCHEDULER, demo_tokenizer
    from retom_jax.pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionXLPipeline
    from retom_jax.schedulers import from_config as scheduler_from_config
    from retom_jax.models.vae import VAE, VAEConfig, build_vae_module

    tok = demo_tokenizer()
    ids = dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
               pad_token_id=tok.eos_token_id)

    def text_encoder(spec, seed):
        cfg = TextEncoderConfig(**spec, **ids)
        abstract = nnx.eval_shape(lambda: build_text_encoder(cfg, dtype=dtype,
                                                             rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        return TextEncoder(cfg, graphdef, common.random_params(state, dtype, seed),
                           dtype=dtype, param_dtype=dtype)

    def vae(scaling):
        cfg = VAEConfig(**SD_VAE, scaling_factor=scaling)
        abstract = nnx.eval_shape(lambda: build_vae_module(cfg, dtype=dtype, param_dtype=dtype))
        graphdef, state = nnx.split(abstract)
        return VAE(cfg, graphdef, common.random_params(state, dtype, 3), dtype=dtype,
                   param_dtype=dtype)

    unet = common.random_unet(common.MODELS[model], dtype)
    if common.family(model) == "sdxl":
        sched = scheduler_from_config({**SD15_SCHEDULER, "timestep_spacing": "leading"},
                                      name="euler")
        return StableDiffusionXLPipeline(unet, vae(0.13025), text_encoder(CLIP_L, 1),
                                         text_encoder(CLIP_BIGG, 2), tok, demo_tokenizer(),
                                         sched)
    sched = scheduler_from_config(SD15_SCHEDULER)
    return StableDiffusionPipeline(unet, vae(0.18215), text_encoder(CLIP_L, 1), tok, sched)


def make_merge(method, ratio, first_level, cache_step):
    merge = common.make_merge(method, ratio, first_level)
    if method == "retom_cached":
        merge = dataclasses.replace(merge, cache_step=cache_step)
    return merge


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--models", nargs="+", choices=["demo", "sd15", "sd21", "sdxl"])
    p.add_argument("--weights", help="a diffusers pipeline folder (real weights)")
    p.add_argument("--sizes", type=int, nargs="+", help="image sizes in pixels (square)")
    p.add_argument("--steps", type=int)
    p.add_argument("--images", type=int, default=1, help="images per call (one prompt each)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--ratios", type=float, nargs="+")
    p.add_argument("--cache-step", type=int, default=0,
                   help="retom_cached: the step whose selection is reused afterwards")
    p.add_argument("--dtype")
    p.add_argument("--attention", choices=["auto", "cudnn", "xla", "splash"], default="auto")
    p.add_argument("--repeats", type=int, help="timed calls per row (median)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--compile-only", action="store_true",
                   help="compile each row's sampling program (pipe.compile) and time nothing: "
                        "the whole-pipeline compile time, also where sampling would be slow")
    p.add_argument("--time-budget", type=float, default=None)
    p.add_argument("--out")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for k in ("steps", "repeats", "warmup", "dtype", "ratios", "methods"):
        if getattr(args, k) is None:
            setattr(args, k, preset[k])
    args.models = args.models or (["weights"] if args.weights else preset["models"])
    args.sizes_for = {m: args.sizes or preset["sizes"].get(m) or [1024 if m == "sdxl" else 512]
                      for m in args.models}
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from retom_jax import pipelines as _pipeline  # noqa: F401
    except ImportError as e:
        print(f"pipeline_speed skipped: retom_jax.pipeline is not importable ({e})")
        return 0
    dtype = common.parse_dtype(args.dtype)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "sizes_for")}
    settings["sizes"] = args.sizes_for
    meta = common.run_meta("pipeline_speed", argv, settings, script=__file__)
    writer = common.ResultWriter(args.out, meta)
    budget = common.Budget(args.time_budget)
    stopped = False
    prompts = ["a photo of a cat"] * args.images

    for model in args.models:
        if stopped:
            break
        t0 = time.perf_counter()
        try:
            if args.weights:
                from retom_jax.pipelines.loading import load_pipeline
                pipe = load_pipeline(args.weights, dtype, attention=args.attention)
                label = model if model != "weights" else f"weights:{Path(args.weights).name}"
            elif model == "demo":
                from retom_jax.demo import build_demo_pipeline
                pipe, label = build_demo_pipeline(dtype, attention=args.attention), "demo"
            else:
                pipe, label = random_pipeline(model, dtype), model
        except Exception as e:  # noqa: BLE001
            writer.add(dict(framework="jax", model=model, method="none",
                            error=f"could not build the pipeline: {common.short_error(e)}"))
            continue
        build_s = time.perf_counter() - t0
        first = common.first_attention_level(pipe.unet.config)
        for size in args.sizes_for[model]:
            none_s = None
            for method in ["none"] + [m for m in args.methods if m != "none"]:
                for ratio in ([0.0] if method == "none" else
                              [args.ratios[0]] if method == "todo" else args.ratios):
                    if budget.exhausted():
                        stopped = True
                        break
                    merge = make_merge(method, ratio, first, args.cache_step)
                    row = dict(framework="jax", model=label, height=size, width=size,
                               steps=args.steps, images=args.images, guidance=args.guidance,
                               scheduler=type(pipe.scheduler).__name__, method=method,
                               ratio=0.0 if method == "none" else common.ratio_for(method, ratio),
                               max_downsample=getattr(merge, "max_downsample", None),
                               dtype=common.dtype_name(dtype), attention=args.attention,
                               build_s=build_s)
                    if method == "retom_cached":
                        row["cache_step"] = args.cache_step

                    options = dict(num_inference_steps=args.steps, guidance_scale=args.guidance,
                                   height=size, width=size, output_type="np", merge=merge)

                    def call(seed=0):
                        return pipe(prompts, seed=seed, **options)
                    try:
                        t1 = time.perf_counter()
                        row["compile_s"] = (pipe.compile(prompts, **options) if args.compile_only
                                            else call().compile_seconds)
                        row["first_call_s"] = time.perf_counter() - t1
                        if not args.compile_only:
                            for i in range(args.warmup):
                                call(1 + i)
                            times = []
                            for i in range(args.repeats):
                                t1 = time.perf_counter()
                                call(100 + i)  # a new seed each call: never recompiles
                                times.append(time.perf_counter() - t1)
                            med = statistics.median(times)
                            row.update(median_s=med, p10_s=common.percentile(times, 10),
                                       p90_s=common.percentile(times, 90), min_s=min(times),
                                       repeats=args.repeats, s_per_image=med / args.images,
                                       peak_gb=common.peak_memory_gb())
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory
                        row.update(error=common.short_error(e))
                        if not args.compile_only:
                            row["median_s"] = None
                    if method == "none":
                        none_s = row.get("median_s")
                    if none_s and row.get("median_s"):
                        row["speedup"] = none_s / row["median_s"]
                    writer.add(row)
                    result = (f"compile {row.get('compile_s') or float('nan'):.1f} s"
                              if args.compile_only else
                              f"{row.get('s_per_image') or float('nan'):.3f} s/image")
                    print(f"{label} {size}px {args.steps} steps {method} {row['ratio']:.2f}: "
                          f"{result}"
                          + (f" ERROR {row['error']}" if row.get("error") else ""), flush=True)
                if stopped:
                    break
        del pipe
    writer.finish(stopped_by_budget=stopped)
    import report
    print()
    print(report.pipeline_table(writer.rows))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
