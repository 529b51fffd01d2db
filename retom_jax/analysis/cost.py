"""XLA's own cost counts of a whole sampling call, per image, compiled on the CPU and never
run: ``retom-jax bench cost``.

A pipeline of one of the ``ARCHITECTURES`` is built with abstract parameters (shapes
only: nothing is initialised or downloaded, except the demo's, which ship with the
package), and each program a call runs is lowered and compiled for the CPU: the text
encoding, one step program per kind of denoising step (the loop pieces of the merge
config, and with step caching, the full and the shallow UNet call), and the VAE decoder.
``cost_analysis()`` gives each program's FLOPs and bytes accessed. XLA counts the body of
a loop once, whatever its trip count, so the fused loop is never measured as a whole: each
step program is counted as many times as the loop runs it. The figures depend on the
architecture, the size and the settings only, not on the machine that counts them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ARCHITECTURES", "DEFAULT_SIZE", "CostRow", "per_image", "abstract_pipeline", "pipeline_cost", "cost_table"]

# The real architectures' UNet configs (diffusers config.json fields that shape the model).
_SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768, sample_size=64,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
_SD2_UNET = dict(_SD15_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                 sample_size=96, upcast_attention=True, use_linear_projection=True)
_SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, sample_size=128, transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, hidden_act="quick_gelu")
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, hidden_act="gelu")
_OPENCLIP_BIGG = dict(architecture="CLIPTextModelWithProjection", hidden_size=1280,
                      intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280)
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)

# name: (UNet config, text encoder configs, VAE config, scheduler name, default pixels)
ARCHITECTURES = {
    "sd15": (_SD15_UNET, (_CLIP_L,), _SD_VAE, "pndm", 512),
    "sd2": (_SD2_UNET, (_OPENCLIP_H,), _SD_VAE, "ddim", 768),
    "sdxl": (_SDXL_UNET, (_CLIP_L, _OPENCLIP_BIGG), dict(_SD_VAE, scaling_factor=0.13025,
                                                         sample_size=1024), "euler", 1024),
    "demo": None,  # the shipped demo pipeline (retom_jax.demo), 64 px
}
DEFAULT_SIZE = {"sd15": 512, "sd2": 768, "sdxl": 1024, "demo": 64}


def _abstract(build):
    """``(graphdef, params)`` of a module with shapes only (``ShapeDtypeStruct`` leaves)."""
    from flax import nnx

    from ..models.weights import abstract_module

    graphdef, params = nnx.split(abstract_module(build))
    return graphdef, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)


_PIPES: dict = {}
_MEMO: dict = {}  # program counts already compiled in this process (see pipeline_cost)


def abstract_pipeline(arch: str, dtype=jnp.float32, scheduler: str | None = None):
    """A pipeline of architecture ``arch`` (see ``ARCHITECTURES``) whose parameters are
    abstract: it can be lowered and compiled, not run. ``"demo"`` is the real demo
    pipeline. ``scheduler``: a scheduler name (default: the architecture's own). Built
    once per process and arguments."""
    key = (arch, jnp.dtype(dtype).name, scheduler)
    if key not in _PIPES:
        _PIPES[key] = _build(arch, dtype, scheduler)
    return _PIPES[key]


def _build(arch, dtype, scheduler):
    from .. import pipelines as pl
    from ..demo import build_demo_pipeline, demo_tokenizer
    from ..models.clip import TextEncoder, TextEncoderConfig, MODEL_CLASSES
    from ..models.unet import UNet, UNet2DConditionModel, UNetConfig
    from ..models.vae import VAE, AutoencoderKL, VAEConfig
    from ..schedulers import from_config
    from ..demo import SD15_SCHEDULER

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of "
                         f"{', '.join(ARCHITECTURES)}")
    if arch == "demo":
        pipe = build_demo_pipeline(dtype)
        return pipe if scheduler is None else pipe.with_scheduler(scheduler)
    unet_cfg, text_cfgs, vae_cfg, default_scheduler, _ = ARCHITECTURES[arch]
    kw = dict(dtype=dtype, param_dtype=dtype)
    config = UNetConfig.from_dict(dict(unet_cfg))
    unet = UNet(config, *_abstract(lambda rngs: UNet2DConditionModel(config, rngs=rngs, **kw)),
                dtype)
    vcfg = VAEConfig(**vae_cfg)
    vae = VAE(vcfg, *_abstract(lambda rngs: AutoencoderKL(vcfg, rngs=rngs, **kw)), **kw)
    encoders = []
    for text in text_cfgs:
        tcfg = TextEncoderConfig(**text)
        encoders.append(TextEncoder(tcfg, *_abstract(
            lambda rngs, c=tcfg: MODEL_CLASSES[c.architecture](c, rngs=rngs, **kw)), **kw))
    sched = from_config(SD15_SCHEDULER, scheduler or default_scheduler)
    tok = demo_tokenizer(77)
    if len(encoders) == 2:
        return pl.StableDiffusionXLPipeline(unet, vae, encoders[0], encoders[1], tok, tok,
                                            sched)
    return pl.StableDiffusionPipeline(unet, vae, encoders[0], tok, sched)


@dataclasses.dataclass
class CostRow:
    """One program of a call: how many times the call runs it, and XLA's counts for one
    run (all images of the batch)."""
    program: str
    runs: int
    gflop: float
    gbytes: float


def _counts(jitted, *args) -> tuple[float, float]:
    info = jitted.lower(*args).compile().cost_analysis()
    info = info[0] if isinstance(info, (list, tuple)) else info
    return float(info.get("flops", 0.0)) / 1e9, float(info.get("bytes accessed", 0.0)) / 1e9


def _spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def pipeline_cost(pipe, *, height: int, width: int, steps: int, batch: int = 1,
                  guidance: bool = True, merge=None, step_cache=None,
                  memo: dict | None = None) -> list[CostRow]:
    """The programs a text-to-image call of ``pipe`` runs (``steps`` steps, ``batch``
    images, guidance on or off, ``merge``, ``step_cache``) with XLA's counts, compiled on
    the CPU. ``memo``: where the counts of compiled programs are kept, so that a program
    compiled for one setting is not compiled again for another (default: this process's)."""
    from ..pipelines.request import EncodeConfig, SampleConfig, StepConfig

    memo = _MEMO if memo is None else memo
    cpu = jax.devices("cpu")[0]
    f = pipe.vae_scale_factor
    latent_hw = (height // f, width // f)
    step_cache = pipe.check_step_cache(step_cache)
    if merge is not None:
        pipe.unet.check_merge(merge, latent_hw, key=jax.random.key(0))
    c = pipe.unet.config.in_channels
    shape = (batch, c) + latent_hw
    state = pipe.scheduler.set_timesteps(steps, shape, jnp.float32)
    static = SampleConfig(pipe.scheduler, steps, batch, latent_hw, guidance, merge, True,
                          step_cache=step_cache)
    prompts = ["a photo"] * batch
    negatives = [""] * batch if guidance else None
    ids = pipe._tokenize(prompts, negatives, guidance, False)
    enc = EncodeConfig(guidance, 1)
    rows = []
    with jax.default_device(cpu):
        key = ("encode", id(pipe), enc, _spec(ids).__repr__())
        if key not in memo:
            memo[key] = _counts(jax.jit(pipe._encode, static_argnums=0), enc,
                                _spec(pipe._encode_params()), ids)
        rows.append(CostRow("text encoding", 1, *memo[key]))
        cond = jax.eval_shape(lambda pr, t: pipe._encode(enc, pr, t),
                              _spec(pipe._encode_params()), ids)
        cond = dict(cond, **pipe._added_cond(height, width, batch * (1 + guidance), {},
                                             guidance))
        latents = jax.ShapeDtypeStruct(shape, jnp.float32)
        first = pipe._first_step(static)
        carry = jax.eval_shape(lambda cd, x, s: pipe._start(first, cd, x, s), cond, latents,
                               state)
        params = _spec({"unet": pipe.unet.params, "vae": pipe.vae.params})
        g = {k: jax.ShapeDtypeStruct((), jnp.float32)
             for k in ("guidance_scale", "guidance_rescale", "eta")}
        rng = jax.eval_shape(lambda: jax.random.key(0))
        i = jax.ShapeDtypeStruct((), jnp.int32)

        def piece(step: StepConfig, lo, hi, carry):
            for phase in step.phases(lo, hi):
                program = dataclasses.replace(step, phase=phase)
                runs = sum(step.phase_of(j) == phase for j in range(lo, hi))
                key = ("step", id(pipe), program, shape, guidance)
                if key not in memo:
                    body = jax.jit(lambda p, cd, j, cr, k, gg: pipe._body(
                        program, p, cd, j, cr, k, gg))
                    memo[key] = _counts(body, params, _spec(cond), i, carry, rng, g)
                name = "UNet step" + ("" if phase is None else f" ({phase})")
                if merge is not None:
                    name += f" [{type(merge).__name__} steps {lo}-{hi - 1}]"
                rows.append(CostRow(name, runs, *memo[key]))
            return carry

        carry = pipe._segments(static, cond, carry, piece)
        key = ("decode", id(pipe), shape)
        if key not in memo:
            memo[key] = _counts(jax.jit(pipe._finish, static_argnums=0), True,
                                {"vae": params["vae"]}, carry.latents)
        rows.append(CostRow("VAE decode", 1, *memo[key]))
    return rows


def per_image(rows: list[CostRow], batch: int) -> tuple[float, float]:
    """``(gflop_per_image, gbytes_per_image)`` of a call's programs."""
    flop = sum(r.runs * r.gflop for r in rows) / batch
    data = sum(r.runs * r.gbytes for r in rows) / batch
    return flop, data


def cost_table(rows: list[dict]) -> str:
    """A plain-text table of ``bench cost`` rows."""
    head = f"{'model':6s} {'size':>9s} {'steps':>5s} {'method':>7s} {'ratio':>5s} " \
           f"{'cache':>7s} {'GFLOP/img':>11s} {'GB/img':>9s} {'x base':>7s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cache = "-" if not r["step_cache"] else f"{r['step_cache'][0]}/{r['step_cache'][1]}"
        lines.append(f"{r['model']:6s} {r['height']:>4d}x{r['width']:<4d} {r['steps']:>5d} "
                     f"{r['method']:>7s} {r['ratio']:>5.2f} {cache:>7s} "
                     f"{r['gflop_per_image']:>11.1f} {r['gbytes_per_image']:>9.2f} "
                     f"{r.get('flop_vs_base', float('nan')):>7.3f}")
    return "\n".join(lines)
