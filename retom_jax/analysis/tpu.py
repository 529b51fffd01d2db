"""Compile retom-jax's programs for TPU slices on any host, without a TPU, and read what
the compiler says about them.

With the ``libtpu`` package installed (``pip install "jax[tpu]"``),
``jax.experimental.topologies.get_topology_desc("v5e:2x2", "tpu")`` describes a slice's
devices on a CPU-only machine; a program lowered with abstract arguments
(``jax.ShapeDtypeStruct``) sharded over a ``Mesh`` of those devices compiles to the real
TPU program (Pallas / Mosaic kernels such as splash included). Nothing runs: no weights are
made (the models are abstract), no TPU is touched.

Each program gives a row (`analyse`): whether it compiled, the compile time, whether a
splash kernel is in it, the bytes per chip (``memory_analysis()``: arguments, temporaries,
output) against the chip's HBM, XLA's flops and bytes (``cost_analysis()``, which counts a
loop body once), XLA's own time estimate (``optimal_seconds``) and our roofline over the
compiled HLO (`retom_jax.analysis.roofline`, loop trip counts applied), and the
collectives by kind. ``estimate_s`` is the one to quote: XLA's when it validates (positive,
and the program has no loops, whose bodies it counts once), else the roofline's; its
source is in ``estimate_source``. ALL TPU TIMES HERE ARE ESTIMATES FROM THE COMPILER'S
MODEL, NOT MEASUREMENTS.

    retom-jax bench tpu --topology v5e:2x2 --mesh data=4 --model sd15 --size 512 \\
        --methods none free retom --out docs/tpu/sd15_v5e4.json
    retom-jax bench report docs/tpu/sd15_v5e4.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding
from ..sharding import abstract_array

from .tpu_transformers import TRANSFORMER_MODELS, flux_pipeline_program, transformer_program

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several processes may load it

__all__ = ["CHIPS", "Chip", "chip_for", "topology_devices", "tpu_mesh", "abstract_unet",
           "abstract_pipeline", "unet_call_program", "pipeline_program", "analyse",
           "validate_estimate", "run", "format_table", "main", "TpuUnavailable",
           "ZeroOverheadProbe", "METHODS"]


class TpuUnavailable(RuntimeError):
    """No TPU compiler here (the ``libtpu`` package is missing)."""


# --------------------------------------------------------------------------- chips

@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU chip's published peak figures (per chip)."""
    name: str
    peak_bf16_flops: float   # dense bf16 FLOP/s
    hbm_bandwidth: float     # bytes/s
    hbm_bytes: int           # HBM capacity
    source: str


# Google Cloud's TPU system-architecture pages (bf16 peak, HBM capacity and bandwidth per
# chip), read 2026-12: v5e 197 TFLOP/s, 16 GB, 819 GB/s; v6e (Trillium) 918 TFLOP/s,
# 32 GB, 1640 GB/s; v5p 459 TFLOP/s, 95 GB, 2765 GB/s; v4 275 TFLOP/s, 32 GiB, 1228 GB/s.
# Capacities in decimal GB as published (16 GB = 16e9 bytes: the smaller reading).
CHIPS = {
    "v5e": Chip("v5e", 197e12, 819e9, 16 * 10**9, "https://cloud.google.com/tpu/docs/v5e"),
    "v6e": Chip("v6e", 918e12, 1640e9, 32 * 10**9, "https://cloud.google.com/tpu/docs/v6e"),
    "v5p": Chip("v5p", 459e12, 2765e9, 95 * 10**9, "https://cloud.google.com/tpu/docs/v5p"),
    "v4": Chip("v4", 275e12, 1228e9, 32 * 2**30, "https://cloud.google.com/tpu/docs/v4"),
}


def chip_for(topology: str) -> Chip:
    """The chip of a topology name such as ``"v5e:2x2"``."""
    kind = topology.split(":")[0].lower()
    if kind not in CHIPS:
        raise ValueError(f"unknown TPU generation {kind!r} in topology {topology!r}; "
                         f"choose one of {', '.join(CHIPS)} (e.g. v5e:2x2)")
    return CHIPS[kind]


_TOPOLOGIES: dict = {}


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice (``"v5e:2x2"``: 4 chips; ``"v5e:4x4"``: 16 chips on 4
    hosts; ``"v5e:1x1"``: one chip, the first of a ``2x2``), described on this host by
    libtpu. TpuUnavailable without the ``libtpu`` package."""
    chip_for(topology)
    if topology not in _TOPOLOGIES:
        import importlib.util

        if importlib.util.find_spec("libtpu") is None:
            raise TpuUnavailable("no TPU compiler here (the libtpu package is missing): "
                                 "pip install 'jax[tpu]' (or retom-jax's test extra)")
        try:
            from jax.experimental import topologies
        except ImportError as e:  # pragma: no cover
            raise TpuUnavailable(f"this JAX has no jax.experimental.topologies: {e}") from e
        kind, _, shape = topology.partition(":")
        one = shape in ("1x1", "1", "1x1x1")
        name = f"{kind}:2x2" if one and kind in ("v5e", "v6e") else topology
        try:
            devices = list(topologies.get_topology_desc(name, "tpu").devices)
        except Exception as e:  # noqa: BLE001 - libtpu's errors are plain RuntimeErrors
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "not installed" in text.lower() or "unknown backend" in text.lower():
                raise TpuUnavailable(f"no TPU compiler here ({text}): install it with "
                                     f"pip install 'jax[tpu]'") from e
            raise ValueError(f"topology {topology!r}: {text}") from e
        _TOPOLOGIES[topology] = devices[:1] if one else devices
    return _TOPOLOGIES[topology]


def tpu_mesh(topology: str, mesh: str | dict = "data=-1"):
    """A ``("data", "fsdp", "spatial")`` mesh (`retom_jax.sharding.make_mesh`) over a
    slice's devices; ``mesh``: ``"data=4"``, ``"data=8,fsdp=2"``, ``"spatial=8"`` ..."""
    sizes = sharding.parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
    return sharding.make_mesh(**sizes, devices=topology_devices(topology))


# --------------------------------------------------------------------------- models

# The real architectures (diffusers config.json values), random weights never made.
_SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_SD2_UNET = {**_SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
             "sample_size": 96, "upcast_attention": True, "use_linear_projection": True}
_SDXL_UNET = {
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
    "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
UNET_MODELS = ("demo", "sd15", "sd2", "sdxl")
# The diffusion transformers (``--program transformer``): `tpu_transformers`.
MODELS = UNET_MODELS + tuple(TRANSFORMER_MODELS)
PROGRAMS = ("unet", "pipeline", "transformer", "decode")
TEXT_TOKENS = 77
SDXL_POOLED = 1280  # text_encoder_2's projection: SDXL's text_embeds width


def _unet_config(model: str):
    from ..demo import DEMO_UNET
    from ..models.unet import UNetConfig

    table = {"demo": DEMO_UNET, "sd15": _SD15_UNET, "sd2": _SD2_UNET, "sdxl": _SDXL_UNET}
    if model not in table:
        raise ValueError(f"the unet and pipeline programs take a UNet model ("
                         f"{', '.join(UNET_MODELS)}), not {model!r}; a transformer runs "
                         f"with --program transformer")
    return UNetConfig.from_dict(dict(table[model]))


def _vae_config(model: str):
    from ..demo import DEMO_VAE
    from ..models.vae import VAEConfig

    if model == "demo":
        return DEMO_VAE
    return VAEConfig(**_SD_VAE, scaling_factor=0.13025 if model == "sdxl" else 0.18215)


def abstract_unet(model: str, mesh, dtype=jnp.bfloat16, attention: str = "auto"):
    """A ``retom_jax.UNet`` of ``model``'s architecture whose parameters are abstract
    (shapes and shardings on ``mesh``, no values)."""
    from flax import nnx

    from ..models import weights
    from ..models.unet import UNet, UNet2DConditionModel

    config = _unet_config(model)
    module = weights.abstract_module(lambda rngs: UNet2DConditionModel(
        config, attention=attention, dtype=dtype, param_dtype=dtype, rngs=rngs))
    graphdef, state = nnx.split(module)
    placed = sharding.abstract_params(state, mesh)
    return UNet(config, graphdef, placed, dtype, attention, mesh)


def abstract_vae(model: str, mesh, dtype=jnp.bfloat16):
    from flax import nnx

    from ..models.vae import VAE, build_vae_module

    cfg = _vae_config(model)
    module = nnx.eval_shape(lambda: build_vae_module(cfg, dtype=dtype, param_dtype=dtype))
    graphdef, state = nnx.split(module)
    return VAE(cfg, graphdef, sharding.abstract_params(state, mesh), dtype=dtype,
               param_dtype=dtype, mesh=mesh)


# --------------------------------------------------------------------------- methods

def _probe_class():
    from ..merge import BlockMerge, MergeMethod

    @dataclasses.dataclass(frozen=True)
    class ZeroOverheadProbe(MergeMethod):
        """The zero-overhead limit of merging at the same attention sizes: ``merge`` keeps
        the first ``N - r`` tokens (a slice), ``unmerge`` tiles them back (one full-size
        write). The same probe as ``benchmarks/common.FreeMerge``; outputs meaningless."""
        ratio: float = 0.5
        max_downsample: int = 1
        merge_attn: bool = True
        merge_crossattn: bool = False
        merge_mlp: bool = False

        def for_block(self, tokens, grid, downsample, key=None, cache=None, use_cache=False):
            n = tokens.shape[1]
            m = n - int(n * self.ratio)
            if m >= n:
                return BlockMerge.branches(self, lambda x: x, lambda x: x), None
            reps = -(-n // m)
            return BlockMerge.branches(
                self, lambda x: x[:, :m],
                lambda x: jnp.concatenate([x] * reps, axis=1)[:, :n]), None

    return ZeroOverheadProbe


ZeroOverheadProbe = None  # set on first use (the merge module imports flax)

# name -> what it is
METHODS = {
    "none": "no merging",
    "free": "the zero-overhead probe (slice / tile at ReToM's attention sizes)",
    "tome": "ToMe, tomesd's defaults (max_downsample=1, 2x2 cells)",
    "retom": "ReToM, local matching in 2x2 windows",
    "retom_cached": "ReToM(cache_step=0): a step reusing the cached representatives",
    "todo": "ToDo, keys/values pooled 2x2",
}


def make_method(name: str, ratio: float, first_level: int):
    """The merge config of a method name (None for ``"none"``)."""
    global ZeroOverheadProbe
    from ..merge import ReToM, ToDo, ToMe

    if name == "none":
        return None
    if name == "free":
        ZeroOverheadProbe = ZeroOverheadProbe or _probe_class()
        return ZeroOverheadProbe(ratio=ratio, max_downsample=first_level)
    if name == "tome":
        return ToMe(ratio=ratio, max_downsample=1)
    if name == "retom":
        return ReToM(ratio=ratio, max_downsample=first_level)
    if name == "retom_cached":
        return ReToM(ratio=ratio, max_downsample=first_level, cache_step=0)
    if name == "todo":
        return ToDo(factor=2, max_downsample=first_level)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def _first_level(config) -> int:
    return min(config.attention_downsamples())


# --------------------------------------------------------------------------- programs

def _added(config, rows, mesh):
    if config.addition_embed_type != "text_time":
        return None
    return {"text_embeds": abstract_array((rows, SDXL_POOLED), jnp.float32, mesh,
                                          ("batch", None)),
            "time_ids": abstract_array((rows, 6), jnp.float32, mesh, ("batch", None))}


def unet_call_program(unet, merge, batch: int, size: int, vae_factor: int = 8):
    """``(jitted, args)``: one UNet call on ``batch`` latents of a ``size`` px image
    (``size / vae_factor`` latent rows; batch sharded over data x fsdp, rows over
    spatial), abstract arguments."""
    c, mesh = unet.config, unet.mesh
    hw = size // vae_factor
    rows = sharding.padded_batch(batch, mesh)
    sample = abstract_array((rows, c.in_channels, hw, hw), unet.dtype, mesh,
                            ("batch", None, "rows", None))
    ehs = abstract_array((rows, TEXT_TOKENS, c.cross_attention_dim[0]), unet.dtype, mesh,
                         ("batch", None, None))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    added = _added(c, rows, mesh)
    needs_key = merge is not None and type(merge).__name__ == "ToMe"

    def call(params, sample, ehs, added, key):
        out = unet.apply(params, sample, jnp.float32(500.0), ehs, added, merge=merge,
                         key=key if needs_key else None)
        return out.sample

    return jax.jit(call), (unet.params, sample, ehs, added, key)


def decode_program(vae, batch: int, size: int):
    """``(jitted, args)``: the VAE decoder on ``batch`` images of ``size`` px (latents split
    by images over data x fsdp and by rows over spatial), abstract arguments."""
    hw = size // vae.config.vae_scale_factor
    rows = sharding.padded_batch(batch, vae.mesh)
    z = abstract_array((rows, vae.config.latent_channels, hw, hw), vae.dtype, vae.mesh,
                       ("batch", None, "rows", None))
    return jax.jit(vae.apply_decode), (vae.params, z)


def abstract_pipeline(model: str, mesh, dtype=jnp.bfloat16):
    """A text-to-image pipeline of ``model``'s architecture with abstract weights on
    ``mesh`` (text encoders too, unused: the conditioning is an argument of the
    sampling program)."""
    from flax import nnx

    from ..models.clip import TextEncoder, TextEncoderConfig, build_text_encoder
    from ..demo import DEMO_SCHEDULER, DEMO_TEXT, SD15_SCHEDULER, demo_tokenizer
    from ..pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionXLPipeline
    from ..schedulers import from_config

    unet, vae = abstract_unet(model, mesh, dtype), abstract_vae(model, mesh, dtype)
    tok = demo_tokenizer()
    ids = dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
               pad_token_id=tok.eos_token_id)

    def text(hidden, **extra):
        spec = dict(DEMO_TEXT, hidden_size=hidden, **extra)
        cfg = TextEncoderConfig(**spec, **ids)
        module = nnx.eval_shape(lambda: build_text_encoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(module)
        return TextEncoder(cfg, graphdef, state, dtype=dtype, param_dtype=dtype)

    cross = unet.config.cross_attention_dim[0]
    if model == "sdxl":
        sched = from_config({**SD15_SCHEDULER, "timestep_spacing": "leading"}, name="euler")
        pipe = StableDiffusionXLPipeline(
            unet, vae, text(768), text(cross - 768, architecture="CLIPTextModelWithProjection",
                                       projection_dim=SDXL_POOLED),
            tok, demo_tokenizer(), sched)
    else:
        sched = from_config(DEMO_SCHEDULER if model == "demo" else SD15_SCHEDULER)
        pipe = StableDiffusionPipeline(unet, vae, text(cross), tok, sched)
    pipe.mesh = mesh
    return pipe


def pipeline_program(pipe, merge, batch: int, size: int, steps: int):
    """``(jitted, args)``: the whole sampling loop (``steps`` steps, classifier-free
    guidance) and the VAE decode, as ``pipe(...)`` compiles it on its mesh, with abstract
    arguments."""
    from jax.sharding import NamedSharding, PartitionSpec

    from ..pipelines.mesh import sample_jit
    from ..pipelines.request import SampleConfig

    mesh = pipe.mesh
    rows = sharding.padded_batch(batch, mesh)
    f = pipe.vae_scale_factor
    hw = (size // f, size // f)
    c = pipe.unet.config
    shape = (rows, c.in_channels) + hw
    latent = abstract_array(shape, jnp.float32, mesh, ("batch", None, "rows", None))
    rep = NamedSharding(mesh, PartitionSpec())
    cond = {"encoder_hidden_states": abstract_array(
        (2 * rows, TEXT_TOKENS, c.cross_attention_dim[0]), pipe.unet.dtype, mesh,
        ("batch", None, None))}
    cond.update(_added(c, 2 * rows, mesh) or {})
    state = pipe.scheduler.set_timesteps(steps, shape, jnp.float32)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        np.shape(x), x.dtype, sharding=latent.sharding if np.shape(x) == shape else rep), state)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=rep)
    g = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
         for k in ("guidance_scale", "guidance_rescale", "eta")}
    params = {"unet": pipe.unet.params, "vae": pipe.vae.params}
    static = SampleConfig(pipe.scheduler, steps, rows, hw, True, merge, True)
    args = (params, cond, latent, state, key, g)
    jitted = sample_jit(pipe.sample_function, mesh, args, decode=True)
    return jitted, (static,) + args


# --------------------------------------------------------------------------- analysis

def _first(info):
    return info[0] if isinstance(info, (list, tuple)) else info


def analyse(compiled, chip: Chip) -> dict:
    """The row fields of a compiled TPU program: per-chip bytes, XLA's counts and time
    estimate, the roofline estimate, collectives, whether splash is in it."""
    from .roofline import roofline, top_sources

    text = compiled.as_text()
    mem = compiled.memory_analysis()
    cost = _first(compiled.cost_analysis()) or {}
    roof = roofline(text, chip.peak_bf16_flops, chip.hbm_bandwidth)
    row = {
        "splash": roof.splash_sites > 0,
        "splash_calls": roof.splash_sites,  # call sites in the program text
        "argument_bytes": int(mem.argument_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "hbm_bytes": chip.hbm_bytes,
        "xla_flops": float(cost.get("flops", 0.0)),
        "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "xla_optimal_seconds": cost.get("optimal_seconds"),
        "roofline_flops": roof.flops,
        "roofline_bytes": roof.bytes,
        "roofline_seconds": roof.seconds,
        "roofline_compute_seconds": roof.compute_seconds,
        "roofline_memory_seconds": roof.memory_seconds,
        "loops": roof.loops,
        "unknown_trip_counts": roof.unknown_trip_counts,
        "collectives": sharding.count_collectives(text),
        "roofline_top": [[k, v] for k, v in top_sources(roof)],
    }
    row["per_chip_bytes"] = (row["argument_bytes"] + row["temp_bytes"] + row["output_bytes"]
                             - row["alias_bytes"])
    row["fits"] = row["per_chip_bytes"] <= chip.hbm_bytes
    xla = row["xla_optimal_seconds"]
    # One model for every row, so that methods compare: the roofline (XLA's figure counts
    # loop bodies once, goes negative on large programs, and leaves custom calls such as
    # splash out of its flops).
    row["estimate_s"], row["estimate_source"] = roof.seconds, "roofline"
    row["estimated_seconds"] = xla  # XLA's own figure, as it came (may be negative)
    return row


def validate_estimate(topology: str = "v5e:2x2", n: int = 8192) -> dict:
    """XLA's ``optimal_seconds`` and the roofline on programs whose answer is known: an
    ``n x n`` bf16 matmul (``2 n^3`` flops at the chip's peak) and the same matmul in a
    10-step ``fori_loop`` (10 times that). Returns both estimates and the ideal."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from .roofline import roofline

    chip = chip_for(topology)
    mesh = Mesh(np.array(topology_devices(topology)[:1]), ("data",))
    s = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    out = {}
    programs = {
        "matmul": (lambda a, b: a @ b, 1),
        "matmul_x10_loop": (lambda a, b: jax.lax.fori_loop(
            0, 10, lambda i, x: (x @ b).astype(a.dtype), a), 10),
    }
    for name, (fn, times) in programs.items():
        compiled = jax.jit(fn).lower(s, s).compile()
        cost = _first(compiled.cost_analysis())
        ideal = times * 2 * n ** 3 / chip.peak_bf16_flops
        out[name] = {"ideal_s": ideal, "xla_optimal_seconds": cost.get("optimal_seconds"),
                     "roofline_s": roofline(compiled.as_text(), chip.peak_bf16_flops,
                                            chip.hbm_bandwidth).seconds}
    return out


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = next((t for t in text if t.strip()), type(e).__name__)
    return f"{type(e).__name__}: {line[:300]}"


def compile_row(program: str, model: str, topology: str, mesh_text: str, method: str, *,
                size: int, batch: int, steps: int = 30, ratio: float = 0.5,
                dtype=jnp.bfloat16, keep_text: bool = False) -> dict:
    """Compile one program (``"unet"``: one UNet call; ``"pipeline"``: the sampling loop
    and the decoder; ``"decode"``: the VAE decoder alone, ``batch`` images, no merging;
    ``"transformer"``: one call of a diffusion transformer, ``model``
    one of `TRANSFORMER_MODELS`) for ``topology`` / ``mesh_text`` and return its row. A
    program that does not compile gives ``compiled`` = the one-line reason."""
    chip = chip_for(topology)
    row = {"program": program, "model": model, "topology": topology, "mesh": mesh_text,
           "method": method, "size": size, "batch": batch, "ratio": ratio,
           "dtype": jnp.dtype(dtype).name, "chip": chip.name,
           "steps": steps if program == "pipeline" else None}
    try:
        mesh = tpu_mesh(topology, mesh_text)
        row["chips"] = int(mesh.size)
        if program == "unet":
            unet = abstract_unet(model, mesh, dtype)
            merge = make_method(method, ratio, _first_level(unet.config))
            jitted, args = unet_call_program(unet, merge, batch, size,
                                             _vae_config(model).vae_scale_factor)
        elif program == "pipeline" and model in TRANSFORMER_MODELS:
            jitted, args, info = flux_pipeline_program(model, mesh, method, size=size,
                                                       batch=batch, steps=steps, ratio=ratio,
                                                       dtype=dtype)
            row.update(info)
        elif program == "pipeline":
            pipe = abstract_pipeline(model, mesh, dtype)
            merge = make_method(method, ratio, _first_level(pipe.unet.config))
            jitted, args = pipeline_program(pipe, merge, batch, size, steps)
        elif program == "decode":
            jitted, args = decode_program(abstract_vae(model, mesh, dtype), batch, size)
        elif program == "transformer":
            jitted, args, info = transformer_program(model, mesh, method, size=size,
                                                     batch=batch, ratio=ratio, dtype=dtype)
            row.update(info)
        else:
            raise ValueError(f"unknown program {program!r}: {', '.join(PROGRAMS)}")
        t0 = time.perf_counter()
        lowered = jitted.lower(*args)
        compiled = lowered.compile()
        row["compile_s"] = round(time.perf_counter() - t0, 2)
    except TpuUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - the row records why
        row["compiled"] = _reason(e)
        return row
    row["compiled"] = True
    row.update(analyse(compiled, chip))
    if keep_text:
        row["_hlo"] = compiled.as_text()
    return row


def run(programs=("unet", "pipeline"), models=("demo",), topologies=("v5e:2x2",),
        meshes=("data=-1",), methods=("none", "free", "retom"), sizes=None, batch: int = 2,
        steps: int = 30, ratio: float = 0.5, dtype=jnp.bfloat16, on_row=None) -> list[dict]:
    """Rows for every combination (one compile each, one at a time)."""
    rows = []
    for program in programs:
        for model in models:
            for size in sizes or [_default_size(model)]:
                for topology in topologies:
                    for mesh_text in meshes:
                        # the decoder does not merge: one row, whatever the methods
                        for method in (["none"] if program == "decode" else methods):
                            row = compile_row(program, model, topology, mesh_text, method,
                                              size=size, batch=batch, steps=steps,
                                              ratio=ratio, dtype=dtype)
                            rows.append(row)
                            if on_row is not None:
                                on_row(row)
    return rows


def _default_size(model: str) -> int:
    if model in TRANSFORMER_MODELS:
        return 64 if model.endswith("tiny") else 1024
    return {"demo": 64, "sdxl": 1024}.get(model, 512)


# --------------------------------------------------------------------------- report

def _gb(v) -> str:
    return "-" if v is None else f"{v / 1e9:.2f}"


def _sec(v) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:.3g} ms" if abs(v) < 1 else f"{v:.3g} s"


def format_table(rows: list[dict]) -> str:
    """A markdown table of TPU rows (times labelled as estimates)."""
    head = ("| program | model | size | batch | topology | mesh | method | compiled | splash "
            "| GB/chip (args+temp+out) | HBM GB | est. time (source) | vs probe | XLA "
            "optimal_seconds | collectives |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    probe = {}
    for r in rows:
        if r.get("method") == "free" and r.get("compiled") is True:
            probe[_key(r)] = r["estimate_s"]
    for r in rows:
        ok = r.get("compiled") is True
        coll = ", ".join(f"{k} {v}" for k, v in (r.get("collectives") or {}).items() if v) or "-"
        base = probe.get(_key(r))
        vs = f"{r['estimate_s'] / base:.2f}x" if ok and base else "-"
        lines.append("| " + " | ".join(str(x) for x in [
            r["program"], r["model"], r["size"], r["batch"], r["topology"], r["mesh"],
            r["method"], "yes" if ok else r.get("compiled"), "yes" if r.get("splash") else "no",
            _gb(r.get("per_chip_bytes")), _gb(r.get("hbm_bytes")),
            f"{_sec(r.get('estimate_s'))} ({r.get('estimate_source', '-')})" if ok else "-",
            vs, _sec(r.get("xla_optimal_seconds")), coll]) + " |")
    return "\n".join(lines)


def _key(r):
    return (r["program"], r["model"], r["size"], r["batch"], r["topology"], r["mesh"],
            r.get("steps"))


# --------------------------------------------------------------------------- CLI

def build_parser(prog: str = "retom-jax bench tpu") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Compile retom-jax's programs for a TPU slice on this host "
        "(no TPU needed: libtpu's compiler) and report memory per chip and XLA's cost and "
        "time ESTIMATES (not measurements).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--topology", nargs="+", default=["v5e:2x2"],
                   help="TPU slices, e.g. v5e:2x2 (4 chips), v5e:2x4, v5e:4x4 (16 chips, 4 "
                        "hosts), v5e:1x1 (one chip), v6e:2x2, v5p:2x2x1")
    p.add_argument("--mesh", nargs="+", default=["data=-1"],
                   help="mesh axes per run, e.g. data=4 / data=8,fsdp=2 / spatial=8")
    p.add_argument("--model", nargs="+", default=["demo"], choices=MODELS)
    p.add_argument("--program", nargs="+", default=["unet", "pipeline"], choices=PROGRAMS,
                   help="unet / pipeline (UNet models; pipeline also for flux-dev / "
                        "flux-schnell); transformer (flux-dev, flux-schnell, sd35-medium: "
                        "one transformer call); decode (UNet models: the VAE decoder alone)")
    p.add_argument("--methods", nargs="+", default=["none", "free", "retom"],
                   choices=list(dict.fromkeys([*METHODS, "retom_attn"])),
                   help="transformers: none, retom (merge_mlp), retom_attn, tome, todo")
    p.add_argument("--size", nargs="+", type=int, default=None,
                   help="image sizes in px (default: 64 demo, 512 sd15/sd2, 1024 sdxl and "
                        "the transformers)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch for 'unet'; images "
                   "for 'pipeline' (guidance doubles the UNet's) and 'decode'")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--validate", action="store_true",
                   help="first check the estimates on a matmul whose time is known")
    p.add_argument("--out", help="JSON file to write ({meta, rows})")
    return p


def _write(path, meta, rows):
    if path is None:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    os.replace(tmp, out)


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    meta = {"benchmark": "tpu", "command": "retom-jax bench tpu " + " ".join(
        sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "TPU times are XLA's / the roofline's ESTIMATES, compiled on a CPU host "
                "with libtpu; nothing ran on a TPU",
        "versions": {"jax": jax.__version__, "libtpu": _libtpu_version()},
        "chips": {k: dataclasses.asdict(v) for k, v in CHIPS.items()}}
    rows: list[dict] = []
    try:
        if args.validate:
            meta["validation"] = validate_estimate(args.topology[0])
            print(json.dumps(meta["validation"], indent=1))

        def on_row(row):
            rows.append(row)
            _write(args.out, meta, rows)
            print(format_table([row]).splitlines()[-1], flush=True)

        print(format_table([]))
        run(args.program, args.model, args.topology, args.mesh, args.methods, args.size,
            args.batch, args.steps, args.ratio, dtype, on_row=on_row)
    except TpuUnavailable as e:
        print(f"retom-jax bench tpu: {e}", file=sys.stderr)
        return 2
    if len(rows) > 1:
        print()
        print(format_table(rows))
    return 0


def _libtpu_version():
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
