"""The diffusion transformers' programs for `retom_jax.analysis.tpu` (``retom-jax bench tpu
--model flux-dev --program transformer``): Flux.1 and SD3.5's transformers at their real
architectures with abstract weights placed on a mesh by the sharding rules, and one
transformer call as a jitted program with abstract, sharded arguments.

Nothing here compiles or imports libtpu: `retom_jax.analysis.tpu.compile_row` builds the
mesh (a TPU slice's devices), calls `transformer_program` and compiles. The same programs
lower for host CPU devices (the tests check the parameter placement that way).

Batch: as the UNet program, the batch is padded to a multiple of ``data x fsdp``
(`sharding.padded_batch`) and split over those axes, so on ``fsdp=8`` a batch of 1 runs 8
rows, one per chip (each chip computes one image with the weights gathered layer by layer;
FSDP's pattern). A row records both (``batch`` and ``rows``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..sharding import abstract_array

__all__ = ["TRANSFORMER_MODELS", "TEXT_TOKENS", "FLUX_TINY", "SD3_TINY", "FLUX_VAE",
           "FLUX_SCHEDULER", "transformer_methods", "make_transformer_method",
           "transformer_config", "abstract_transformer", "transformer_call_program",
           "transformer_program", "flux_pipeline_program", "param_bytes"]

# Tiny architectures of the same classes (tests, smoke runs): one block of each kind,
# 2 heads of the real head size (so splash takes them), 256 channels (so the sharding
# rules split their larger kernels: `sharding.MIN_SHARD_SIZE`).
FLUX_TINY = dict(num_layers=1, num_single_layers=1, attention_head_dim=128,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                 in_channels=16, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD3_TINY = dict(num_layers=2, attention_head_dim=128, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=256, pooled_projection_dim=16,
                in_channels=16, out_channels=16, pos_embed_max_size=64,
                dual_attention_layers=(0,), qk_norm="rms_norm")

# model name -> (family, config name in its module or a dict). The real architectures
# live next to their models (models.flux.FLUX_DEV / FLUX_SCHNELL, models.sd3.SD35_MEDIUM).
TRANSFORMER_MODELS = {
    "flux-dev": ("flux", "FLUX_DEV"),
    "flux-schnell": ("flux", "FLUX_SCHNELL"),
    "sd35-medium": ("sd3", "SD35_MEDIUM"),
    "flux-tiny": ("flux", FLUX_TINY),
    "sd3-tiny": ("sd3", SD3_TINY),
}
# Flux.1's autoencoder and scheduler (diffusers' vae/config.json and
# scheduler/scheduler_config.json of FLUX.1-dev; schnell's VAE is the same).
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
FLUX_TINY_VAE = dict(FLUX_VAE, block_out_channels=(32,) * 4, layers_per_block=1,
                     latent_channels=FLUX_TINY["in_channels"] // 4)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                      base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
# Text tokens per family: Flux's 512 T5 tokens; SD3's 77 CLIP + 256 T5.
TEXT_TOKENS = {"flux": 512, "sd3": 333}


def transformer_methods(ratio: float) -> dict:
    """The transformers' merge methods (name -> config; None: no merging), as
    ``benchmarks/flux_cost.py`` measures them: image tokens merged before attention and
    MLP (``merge_mlp``), 2x2 windows for ReToM, ToMe without randomness, ToDo pooling the
    keys/values 2x2."""
    from ..merge import ReToM, ToDo, ToMe

    return {
        "none": None,
        "retom": ReToM(ratio=ratio, window=(2, 2), merge_mlp=True),
        "retom_attn": ReToM(ratio=ratio, window=(2, 2)),
        "tome": ToMe(ratio=ratio, use_rand=False, merge_mlp=True),
        "todo": ToDo(factor=2),
    }


def make_transformer_method(name: str, ratio: float):
    table = transformer_methods(ratio)
    if name not in table:
        raise ValueError(f"method {name!r} has no transformer form; choose from "
                         f"{', '.join(table)}")
    return table[name]


def transformer_config(model: str):
    """``(family, config)`` of a transformer model name (``"flux-dev"`` ...)."""
    if model not in TRANSFORMER_MODELS:
        raise ValueError(f"unknown transformer {model!r}; choose one of "
                         f"{', '.join(TRANSFORMER_MODELS)}")
    family, config = TRANSFORMER_MODELS[model]
    if isinstance(config, str):
        from ..models import flux, sd3

        config = getattr(flux if family == "flux" else sd3, config)
    return family, dict(config)


def abstract_transformer(model: str, mesh, dtype=jnp.bfloat16, attention: str = "auto"):
    """A `FluxTransformer` / `SD3Transformer` of ``model``'s architecture whose parameters
    are abstract, placed on ``mesh`` by the sharding rules; its attention is traced for
    the mesh's platform (splash on a TPU slice)."""
    family, config = transformer_config(model)
    if family == "flux":
        from ..models.flux import abstract_flux_transformer

        return abstract_flux_transformer(config, dtype=dtype, attention=attention, mesh=mesh)
    from ..models.sd3 import abstract_sd3_transformer

    return abstract_sd3_transformer(config, dtype=dtype, attention=attention, mesh=mesh)


def transformer_call_program(model, merge, batch: int, size: int, text: int | None = None):
    """``(jitted, args)``: one transformer call on ``batch`` images of ``size`` px (the
    VAE's /8 then 2x2 patches: ``(size / 16)^2`` image tokens) and ``text`` text tokens
    (default: `TEXT_TOKENS`), abstract arguments with the batch split over data x fsdp."""
    from .. import sharding

    mesh, cfg, dt = model.mesh, model.config, model.dtype
    flux = type(model).__name__ == "FluxTransformer"
    text = text or TEXT_TOKENS["flux" if flux else "sd3"]
    rows = sharding.padded_batch(batch, mesh)
    side = size // 16
    grid = (side, side)
    vec = lambda n, d=dt: abstract_array((rows, n), d, mesh, ("batch", None))  # noqa: E731
    ehs = abstract_array((rows, text, cfg.joint_attention_dim), dt, mesh,
                         ("batch", None, None))
    t = abstract_array((rows,), jnp.float32, mesh, ("batch",))
    if flux:
        rep = lambda shape: abstract_array(shape, jnp.float32, mesh, (None, None))  # noqa: E731
        x = abstract_array((rows, side * side, cfg.in_channels), dt, mesh,
                           ("batch", None, None))
        g = t if cfg.guidance_embeds else None
        args = (x, ehs, vec(cfg.pooled_projection_dim), t, rep((side * side, 3)),
                rep((text, 3)), g)

        def call(params, *a):
            return model.apply(params, *a, merge=merge, grid=grid).sample
    else:
        p = cfg.patch_size
        x = abstract_array((rows, cfg.in_channels, side * p, side * p), dt, mesh,
                           ("batch", None, None, None))
        args = (x, ehs, vec(cfg.pooled_projection_dim), t)

        def call(params, *a):
            return model.apply(params, *a, merge=merge).sample
    return jax.jit(call), (model.params,) + args


def param_bytes(params) -> tuple[int, int]:
    """``(total, per device)`` bytes of abstract parameters (the largest shard of each
    leaf on any device; leaves without a sharding count whole)."""
    total = per = 0
    for a in jax.tree_util.tree_leaves(params):
        item = jnp.dtype(a.dtype).itemsize
        total += math.prod(a.shape) * item
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        per += math.prod(shard) * item
    return total, per


def transformer_program(model: str, mesh, method: str, *, size: int, batch: int,
                        ratio: float = 0.5, dtype=jnp.bfloat16, text: int | None = None):
    """``(jitted, args, info)`` of one ``model`` transformer call on ``mesh`` with
    ``method``; ``info``: the row's extra fields (rows, tokens, parameter bytes)."""
    from .. import sharding

    tr = abstract_transformer(model, mesh, dtype)
    merge = make_transformer_method(method, ratio)
    family = transformer_config(model)[0]
    jitted, args = transformer_call_program(tr, merge, batch, size, text)
    total, per = param_bytes(tr.params)
    info = {"rows": sharding.padded_batch(batch, mesh), "image_tokens": (size // 16) ** 2,
            "text_tokens": text or TEXT_TOKENS[family], "merge": repr(merge),
            "param_bytes": total, "param_bytes_per_chip": per}
    return jitted, args, info


def _abstract_flux_vae(mesh, dtype, tiny=False):
    from flax import nnx

    from .. import sharding
    from ..models.vae import VAE, VAEConfig, build_vae_module

    cfg = VAEConfig(**(FLUX_TINY_VAE if tiny else FLUX_VAE))
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: build_vae_module(cfg, dtype=dtype, param_dtype=dtype)))
    return VAE(cfg, graphdef, sharding.abstract_params(state, mesh), dtype=dtype,
               param_dtype=dtype, mesh=mesh)


def flux_pipeline_program(model: str, mesh, method: str, *, size: int, batch: int,
                          steps: int, ratio: float = 0.5, dtype=jnp.bfloat16,
                          text: int | None = None):
    """``(jitted, args, info)``: a Flux pipeline's whole sampling program as a call
    compiles it (``FluxPipeline.sample_program``: ``steps`` flow-match Euler steps of the
    transformer in a ``fori_loop``, then the VAE decode) for ``batch`` images of ``size``
    px on ``mesh`` (the batch padded to data x fsdp and split over them), abstract
    weights and inputs."""
    from jax.sharding import NamedSharding, PartitionSpec

    from .. import sharding
    from ..pipelines.flux import FluxPipeline, FluxSampleConfig
    from ..schedulers.flow_match import FlowMatchEuler

    family, _ = transformer_config(model)
    if family != "flux":
        raise ValueError(f"--program pipeline takes a Flux model here, not {model!r}")
    tr = abstract_transformer(model, mesh, dtype)
    vae = _abstract_flux_vae(mesh, dtype, tiny=model.endswith("tiny"))
    sched = FlowMatchEuler.from_config(FLUX_SCHEDULER)
    pipe = FluxPipeline(tr, vae, None, None, None, None, sched)
    pipe.mesh = mesh
    merge = make_transformer_method(method, ratio)
    text = text or TEXT_TOKENS["flux"]
    rows = sharding.padded_batch(batch, mesh)
    side = size // 16
    n, cfg = side * side, tr.config
    rep = NamedSharding(mesh, PartitionSpec())
    f32 = jnp.float32
    guidance = abstract_array((rows,), f32, mesh, ("batch",)) if cfg.guidance_embeds else None
    cond = {"embeds": abstract_array((rows, text, cfg.joint_attention_dim), dtype, mesh,
                                     ("batch", None, None)),
            "pooled": abstract_array((rows, cfg.pooled_projection_dim), dtype, mesh,
                                     ("batch", None)),
            "guidance": guidance,
            "img_ids": jax.ShapeDtypeStruct((n, 3), f32, sharding=rep),
            "txt_ids": jax.ShapeDtypeStruct((text, 3), f32, sharding=rep)}
    latents = abstract_array((rows, n, cfg.in_channels), f32, mesh, ("batch", None, None))
    state = sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps),
                                mu=sched.mu(n))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=rep),
                         state)
    static = FluxSampleConfig(steps, rows, (side, side), text, merge, True)
    args = (pipe.params(), cond, latents, state, None, None)
    total, per = param_bytes(pipe.params())
    info = {"rows": rows, "image_tokens": n, "text_tokens": text, "merge": repr(merge),
            "param_bytes": total, "param_bytes_per_chip": per}
    return pipe.sample_program(static), args, info
