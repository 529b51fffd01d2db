"""The Stable Diffusion / SDXL autoencoder (diffusers' ``AutoencoderKL``) in Flax NNX.

Submodules carry the same names as in diffusers, so the weight keys of a diffusers VAE
folder (``encoder.down_blocks.0.resnets.0.conv1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ``post_quant_conv.weight`` ...) map onto
the parameters by :func:`retom_jax.weights.load_params` without special cases. Older
checkpoints whose mid-block attention still uses ``query``/``key``/``value``/``proj_attn``
(possibly stored as 1x1 convolutions) are renamed on load.

Public entry point: :func:`load_vae`, which returns a :class:`VAE`. The public functions
take and return NCHW arrays, as the PyTorch model does; inside, everything is NHWC.

Structure (diffusers ``AutoencoderKL`` with ``DownEncoderBlock2D``/``UpDecoderBlock2D``):

- encoder: ``conv_in`` -> ``down_blocks`` (``layers_per_block`` resnets each and, except
  for the last, a stride-2 convolution after a right/bottom pad) -> ``mid_block``
  (resnet, single-head self-attention over all pixels, resnet) -> ``conv_norm_out`` ->
  SiLU -> ``conv_out`` to ``2 * latent_channels`` (mean and log-variance).
- ``quant_conv`` / ``post_quant_conv``: optional 1x1 convolutions around the latent.
- decoder: ``conv_in`` -> ``mid_block`` -> ``up_blocks`` (channels in reverse order,
  ``layers_per_block + 1`` resnets each and, except for the last, a nearest 2x upsample
  and a convolution) -> ``conv_norm_out`` -> SiLU -> ``conv_out``.

Every GroupNorm uses ``eps = 1e-6`` and ``norm_num_groups`` groups. The mid-block
attention has one head whose size is the channel count (diffusers passes
``attention_head_dim = channels``, hence ``heads = channels // channels = 1``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import sharding
from .attention import check_implementation
from .attention import target as attention_target
from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm
from .weights import CheckpointError, LoadedModel, config_errors, config_fields, dtypes, load_module, parse_dtype, read_model_config

__all__ = ["VAEConfig", "VAE", "DiagonalGaussian", "AutoencoderKL", "load_vae"]

NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` ``config.json`` (defaults as there)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (_UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        def fail(msg):
            raise CheckpointError(f"unsupported VAE config: {msg}")

        for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups",
                     "layers_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        channels = self.block_out_channels
        if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
            fail(f"block_out_channels must be a non-empty list of positive integers, "
                 f"got {list(channels)!r}")
        for name, kind in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = getattr(self, name)
            if len(types) != len(channels):
                fail(f"{name} has {len(types)} entries but block_out_channels has "
                     f"{len(channels)}")
            other = sorted({t for t in types if t != kind})
            if other:
                fail(f"{name} contains {', '.join(other)}; only {kind} is implemented")
        if self.act_fn not in ("silu", "swish"):
            fail(f"act_fn {self.act_fn!r}; only 'silu' is implemented")
        if len(channels) > 16 or max(channels) > 65536 or self.layers_per_block > 64:
            fail("more than 16 levels, 65536 channels or 64 layers per block: not a VAE "
                 "retom-jax builds")
        bad = [c for c in channels if c % self.norm_num_groups]
        if bad:
            fail(f"block_out_channels {bad} are not divisible by norm_num_groups="
                 f"{self.norm_num_groups}")
        for name in ("scaling_factor", "shift_factor"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (int, float)):
                fail(f"{name} must be a number, got {value!r}")
        if self.scaling_factor is None or self.scaling_factor == 0:
            fail(f"scaling_factor must be a non-zero number, got {self.scaling_factor!r}")

    @classmethod
    def from_dict(cls, config: dict, where: str = "VAE config") -> "VAEConfig":
        """Build from a ``config.json`` dict (keys this port does not use are ignored, as
        diffusers does); a ``CheckpointError`` starting with ``where`` when it is not an
        AutoencoderKL this port implements."""
        with config_errors(where):
            class_name = config.get("_class_name") if isinstance(config, dict) else None
            if class_name is not None and class_name != "AutoencoderKL":
                raise ValueError(
                    f"this config describes a {class_name}, not an AutoencoderKL: pass the VAE "
                    f"folder (usually the pipeline's vae/ subfolder)")
            return cls(**config_fields(cls, config))

    def _stats(self, use_stats: bool):
        if not use_stats or self.latents_mean is None or self.latents_std is None:
            return None
        shape = (1, -1, 1, 1)
        return (jnp.asarray(self.latents_mean, jnp.float32).reshape(shape),
                jnp.asarray(self.latents_std, jnp.float32).reshape(shape))

    def to_model_latents(self, z, use_stats: bool = False):
        """The VAE's latents ``z`` (NCHW) as the denoiser sees them: normalised by the
        per-channel ``latents_mean``/``latents_std`` (``use_stats``, as SDXL pipelines
        with them do) or shifted by ``shift_factor``, then times ``scaling_factor``."""
        stats = self._stats(use_stats)
        if stats is not None:
            return (z - stats[0]) * self.scaling_factor / stats[1]
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def from_model_latents(self, x, use_stats: bool = False):
        """The inverse of :meth:`to_model_latents`: what the VAE decoder takes."""
        stats = self._stats(use_stats)
        if stats is not None:
            return x * stats[1] / self.scaling_factor + stats[0]
        return x / self.scaling_factor + (self.shift_factor or 0.0)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD and SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)


# ----------------------------------------------------------------------------- modules

def _resnets(in_channels, out_channels, num_layers, groups, kw) -> nnx.List:
    """``num_layers`` ResnetBlock2D without time embedding, the first from ``in_channels``."""
    return nnx.List([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                   None, groups=groups, eps=NORM_EPS, **kw)
                     for i in range(num_layers)])


def _same(x):
    return x


def _run(resnets, samplers, x, constrain=_same):
    """The resnets in turn, then the block's down/upsampler if it has one; ``constrain``
    after each (a mesh's activation sharding, `sharding.activation_constraint`)."""
    for resnet in resnets:
        x = constrain(resnet(x))
    return x if samplers is None else constrain(samplers[0](x))


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_channels, out_channels, num_layers, add_downsample, groups, *,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups, kw)
        self.downsamplers = (nnx.List([Downsample2D(out_channels, out_channels, padding=0, **kw)])
                             if add_downsample else None)

    def __call__(self, x, constrain=_same):
        return _run(self.resnets, self.downsamplers, x, constrain)


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_channels, out_channels, num_layers, add_upsample, groups, *,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups, kw)
        self.upsamplers = (nnx.List([Upsample2D(out_channels, out_channels, **kw)])
                           if add_upsample else None)

    def __call__(self, x, constrain=_same):
        return _run(self.resnets, self.upsamplers, x, constrain)


class UNetMidBlock2D(nnx.Module):
    """resnet -> (single-head self-attention with GroupNorm and residual) -> resnet."""

    def __init__(self, channels, groups, add_attention, *, attention, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(channels, channels, None, groups=groups, eps=NORM_EPS, **kw)
            for _ in range(2)])
        self.attentions = (nnx.List([
            Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups,
                      eps=NORM_EPS, residual_connection=True, attention=attention, **kw)])
            if add_attention else None)

    def __call__(self, x, constrain=_same):
        x = constrain(self.resnets[0](x))
        if self.attentions is not None:
            x = constrain(self.attentions[0](x))
        return constrain(self.resnets[1](x))


class Encoder(nnx.Module):
    def __init__(self, config: VAEConfig, *, attention, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = conv(config.in_channels, channels[0], **kw)
        blocks = []
        for i, out_ch in enumerate(channels):
            in_ch = channels[max(i - 1, 0)]
            blocks.append(DownEncoderBlock2D(in_ch, out_ch, config.layers_per_block,
                                             i < len(channels) - 1, groups, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention,
                                        attention=attention, **kw)
        self.conv_norm_out = group_norm(channels[-1], groups, NORM_EPS, **kw)
        self.conv_out = conv(channels[-1], 2 * config.latent_channels, **kw)

    def __call__(self, x, constrain=_same):
        x = constrain(self.conv_in(constrain(x)))
        for block in self.down_blocks:
            x = block(x, constrain)
        x = self.mid_block(x, constrain)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, config: VAEConfig, *, attention, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        groups = config.norm_num_groups
        channels = tuple(reversed(config.block_out_channels))
        self.conv_in = conv(config.latent_channels, channels[0], **kw)
        self.mid_block = UNetMidBlock2D(channels[0], groups, config.mid_block_add_attention,
                                        attention=attention, **kw)
        blocks = []
        for i, out_ch in enumerate(channels):
            in_ch = channels[max(i - 1, 0)]
            blocks.append(UpDecoderBlock2D(in_ch, out_ch, config.layers_per_block + 1,
                                           i < len(channels) - 1, groups, **kw))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = group_norm(channels[-1], groups, NORM_EPS, **kw)
        self.conv_out = conv(channels[-1], config.out_channels, **kw)

    def __call__(self, z, constrain=_same):
        x = self.mid_block(constrain(self.conv_in(constrain(z))), constrain)
        for block in self.up_blocks:
            x = block(x, constrain)
        return constrain(self.conv_out(jax.nn.silu(self.conv_norm_out(x))))


class AutoencoderKL(nnx.Module):
    """The full autoencoder on NHWC arrays. Use :func:`load_vae` for the NCHW API."""

    def __init__(self, config: VAEConfig, *, attention="auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_implementation(attention)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        lat = config.latent_channels
        self.encoder = Encoder(config, attention=attention, **kw)
        self.decoder = Decoder(config, attention=attention, **kw)
        self.quant_conv = conv(2 * lat, 2 * lat, kernel=1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = (conv(lat, lat, kernel=1, **kw)
                                if config.use_post_quant_conv else None)

    def encode_moments(self, images, constrain=_same):
        """NHWC images -> NHWC ``[mean | logvar]`` (2 * latent channels), unclamped.
        ``constrain``: ``x -> x`` applied to the activations between layers (on a mesh, the
        batch and row split of `sharding.activation_constraint`)."""
        h = self.encoder(images, constrain)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def decode(self, latents, constrain=_same):
        """NHWC (unscaled) latents -> NHWC images; ``constrain`` as in `encode_moments`."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents, constrain)


# ----------------------------------------------------------------------------- posterior

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior ``N(mean, exp(logvar))``, NCHW; ``logvar`` is clamped to
    ``[-30, 20]``. A pytree, so it can leave a ``jax.jit``."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key) -> jax.Array:
        """``mean + std * noise`` with ``noise = jax.random.normal(key, mean.shape)`` drawn
        in float32 and cast to the posterior's dtype."""
        noise = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL divergence to the standard normal, summed over C, H, W: shape ``[batch]``."""
        m, lv = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        return 0.5 * jnp.sum(m * m + jnp.exp(lv) - 1.0 - lv, axis=(1, 2, 3))


# ----------------------------------------------------------------------------- wrapper

class VAE(LoadedModel):
    """A loaded autoencoder (`weights.LoadedModel`: ``config``, ``graphdef``, ``params``,
    ``dtype``, ``param_dtype``, ``mesh``).

    ``apply_encode(params, images)`` / ``apply_decode(params, latents)`` are pure functions
    of their arguments (NCHW in, NCHW out) for use inside your own ``jax.jit``;
    ``encode``/``decode`` are jitted conveniences that use ``self.params``. Inputs are cast
    to the compute dtype ``self.dtype`` and outputs come back in it.

    ``decode`` applies no latent scaling (as diffusers' ``vae.decode(z).sample``): divide
    by ``config.scaling_factor`` (after subtracting ``config.shift_factor`` where set) first.
    """

    def __init__(self, config: VAEConfig, graphdef, params, *, dtype, param_dtype,
                 upcast: bool = False, folder=None, mesh=None):
        super().__init__(config, graphdef, params, dtype=dtype, param_dtype=param_dtype,
                         mesh=mesh)
        self.upcast = upcast
        self.folder = folder
        self._encode = jax.jit(self.apply_encode)
        self._decode = jax.jit(self.apply_decode)

    def __repr__(self):
        c = self.config
        return (f"VAE(block_out_channels={list(c.block_out_channels)}, latent_channels="
                f"{c.latent_channels}, dtype={self.dtype.name}, param_dtype="
                f"{self.param_dtype.name}, upcast={self.upcast}, folder={self.folder})")

    # -- input checks (run at trace time, so before anything compiles)

    def _check(self, x, what: str, channels: int, multiple: int):
        shape = tuple(getattr(x, "shape", ()))
        layout = f"[batch, {channels}, height, width] (NCHW)"
        if len(shape) != 4:
            raise ValueError(f"{what} must have shape {layout}, got shape {shape}")
        if shape[1] != channels:
            hint = (" It looks like NHWC: transpose it to NCHW first."
                    if shape[3] == channels else "")
            raise ValueError(f"{what} must have {channels} channels in axis 1 {layout}, "
                             f"got shape {shape}.{hint}")
        h, w = shape[2], shape[3]
        if h < 1 or w < 1 or h % multiple or w % multiple:
            need = "positive" if multiple == 1 else f"positive multiples of {multiple}"
            raise ValueError(f"{what} height and width must be {need}, got {h}x{w}")
        dtype = getattr(x, "dtype", None)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{what} must be a float array, got dtype {np.dtype(dtype).name}"
                             + (" (scale uint8 images to [-1, 1] first)" if what == "images"
                                else ""))

    def _constrain(self):
        """On a mesh, the activations stay split by images (``data`` x ``fsdp``) and rows
        (``spatial``) between layers: left alone, XLA follows the fsdp-split conv kernels
        and splits activations by channels instead, gathering them back (and a whole
        batch's feature maps) around every conv (SD's decoder, four 512 px images on a
        v5e-4 with fsdp=4: 2.7 GB of temporaries per chip instead of 1.0 GB)."""
        return sharding.activation_constraint(self.mesh) or _same

    # -- pure functions

    def apply_decode(self, params, latents):
        """NCHW latents ``[B, latent_channels, h, w]`` -> NCHW images ``[B, out_channels,
        h * f, w * f]`` with ``f = config.vae_scale_factor``."""
        self._check(latents, "latents", self.config.latent_channels, 1)
        module = nnx.merge(self.graphdef, params)
        z = jnp.transpose(jnp.asarray(latents).astype(self.dtype), (0, 2, 3, 1))
        with attention_target(self.mesh):
            out = module.decode(z, self._constrain())
        return jnp.transpose(out.astype(self.dtype), (0, 3, 1, 2))

    def apply_encode(self, params, images) -> DiagonalGaussian:
        """NCHW images ``[B, in_channels, H, W]`` (values in [-1, 1], H and W multiples of
        ``config.vae_scale_factor``) -> the posterior over NCHW latents."""
        self._check(images, "images", self.config.in_channels, self.config.vae_scale_factor)
        module = nnx.merge(self.graphdef, params)
        x = jnp.transpose(jnp.asarray(images).astype(self.dtype), (0, 2, 3, 1))
        with attention_target(self.mesh):
            moments = module.encode_moments(x, self._constrain())
        moments = jnp.transpose(moments.astype(self.dtype), (0, 3, 1, 2))
        mean, logvar = jnp.split(moments, 2, axis=1)
        return DiagonalGaussian(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    # -- jitted conveniences

    def decode(self, latents) -> jax.Array:
        latents = _as_array(latents)
        self._check(latents, "latents", self.config.latent_channels, 1)
        return self._decode(self.params, latents)

    def encode(self, images) -> DiagonalGaussian:
        images = _as_array(images)
        self._check(images, "images", self.config.in_channels, self.config.vae_scale_factor)
        return self._encode(self.params, images)


def _as_array(x):
    """JAX/NumPy arrays as they are; anything else (lists, CPU torch tensors) via NumPy."""
    return x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x)


# ----------------------------------------------------------------------------- loading

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def convert_legacy_keys(state: dict) -> dict:
    """Rename the attention keys of older diffusers VAEs (``query``/``key``/``value``/
    ``proj_attn``) and flatten projection weights stored as 1x1 convolutions."""
    out = {}
    for key, array in state.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
            new = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
            if new not in state:
                key = new
        if (key.endswith(".weight") and ".attentions." in key
                and key[: -len(".weight")].endswith(_PROJECTIONS)
                and array.ndim == 4 and array.shape[2:] == (1, 1)):
            array = np.asarray(array).reshape(array.shape[:2])
        out[key] = array
    return out


def build_vae_module(config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                     attention="auto", seed: int = 0) -> AutoencoderKL:
    """A randomly initialised :class:`AutoencoderKL` (for tests and training from scratch)."""
    return AutoencoderKL(config, attention=attention, dtype=parse_dtype(dtype),
                         param_dtype=parse_dtype(param_dtype), rngs=nnx.Rngs(seed))


def load_vae(path, dtype=jnp.float32, param_dtype=None, subfolder: str | None = "vae",
             variant: str | None = None, force_upcast: bool | None = None,
             attention: str = "auto", mesh=None) -> VAE:
    """Load a diffusers ``AutoencoderKL``.

    ``path``: a VAE folder (``config.json`` + ``diffusion_pytorch_model[.variant]
    .safetensors``), a pipeline folder (its ``subfolder``, ``vae/`` by default), or a
    Hugging Face repo id already in the local cache. Nothing is downloaded.

    ``dtype`` is the compute dtype and ``param_dtype`` (default: the compute dtype) the
    stored weights' dtype. If the config has ``force_upcast: true`` (SDXL's VAE) and
    ``dtype`` is float16, the VAE computes (and by default stores weights) in float32, as
    diffusers' pipelines upcast it; ``force_upcast=False`` keeps float16,
    ``force_upcast=True`` upcasts even if the config does not ask for it.
    ``mesh``: place the parameters on it (``sharding.LOGICAL_AXIS_RULES``).
    """
    requested = parse_dtype(dtype)
    if force_upcast is not None and not isinstance(force_upcast, bool):
        raise ValueError(f"force_upcast must be None, True or False, got {force_upcast!r}")
    check_implementation(attention)
    folder, config = read_model_config(path, subfolder, VAEConfig)
    upcast_wanted = config.force_upcast if force_upcast is None else force_upcast
    upcast = bool(upcast_wanted) and requested == jnp.dtype(jnp.float16)
    compute, pdtype = dtypes(jnp.float32 if upcast else requested, param_dtype)
    graphdef, params = load_module(
        folder, lambda rngs: AutoencoderKL(config, attention=attention, dtype=compute,
                                           param_dtype=pdtype, rngs=rngs),
        pdtype, stem="diffusion_pytorch_model", variant=variant, mesh=mesh,
        convert=convert_legacy_keys)
    return VAE(config, graphdef, params, dtype=compute, param_dtype=pdtype, upcast=upcast,
               folder=folder, mesh=mesh)
