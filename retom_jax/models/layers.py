"""Building blocks shared by the UNet and the VAE, named as in diffusers.

Everything works on NHWC images and ``[batch, tokens, channels]`` token arrays. Each
module takes ``dtype`` (activations) and ``param_dtype`` (stored weights) explicitly.
Normalisation statistics are always computed in float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import dot_product_attention


class Identity(nnx.Module):
    """Parameter-free placeholder where PyTorch has a dropout in a ``Sequential``/list,
    so that list indices (and weight keys) line up."""

    def __call__(self, x):
        return x


def conv(cin, cout, kernel=3, stride=1, padding=None, *, dtype, param_dtype, rngs):
    pad = (kernel // 2) if padding is None else padding
    return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                    padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs)


def linear(cin, cout, bias=True, *, dtype, param_dtype, rngs):
    return nnx.Linear(cin, cout, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def group_norm(channels, groups, eps, *, dtype, param_dtype, rngs):
    # use_fast_variance=False: E[(x - mean)^2], which stays exact for the VAE's large activations
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=dtype,
                         param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)


def layer_norm(channels, eps, *, dtype, param_dtype, rngs):
    return nnx.LayerNorm(channels, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                         use_fast_variance=False, rngs=rngs)


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
    """Sinusoidal embedding of ``timesteps [B]`` -> ``[B, dim]`` in float32, as diffusers'
    ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_channels, time_embed_dim, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = linear(in_channels, time_embed_dim, **kw)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """diffusers' ``ResnetBlock2D`` with ``time_embedding_norm="default"`` and SiLU."""

    def __init__(self, in_channels, out_channels, temb_channels, *, groups=32, eps=1e-6,
                 output_scale_factor=1.0, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = group_norm(in_channels, groups, eps, **kw)
        self.conv1 = conv(in_channels, out_channels, **kw)
        self.time_emb_proj = linear(temb_channels, out_channels, **kw) if temb_channels else None
        self.norm2 = group_norm(out_channels, groups, eps, **kw)
        self.conv2 = conv(out_channels, out_channels, **kw)
        self.conv_shortcut = (conv(in_channels, out_channels, kernel=1, **kw)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def __call__(self, x, temb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Strided 3x3 convolution. ``padding=0`` pads right/bottom by one first (the VAE)."""

    def __init__(self, channels, out_channels=None, padding=1, *, dtype, param_dtype, rngs):
        self.conv = conv(channels, out_channels or channels, stride=2, padding=padding,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.padding = padding

    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def resize_nearest(x, size):
    """Nearest-neighbour resize of NHWC ``x`` to ``size=(h, w)``, as torch's
    ``F.interpolate(mode="nearest")``."""
    h, w = x.shape[1:3]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = jnp.minimum(jnp.floor(jnp.arange(size[0]) * (h / size[0])).astype(jnp.int32), h - 1)
    cols = jnp.minimum(jnp.floor(jnp.arange(size[1]) * (w / size[1])).astype(jnp.int32), w - 1)
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest 2x upsampling (or to an explicit size) followed by a 3x3 convolution."""

    def __init__(self, channels, out_channels=None, *, dtype, param_dtype, rngs):
        self.conv = conv(channels, out_channels or channels, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, size=None):
        return self.conv(resize_nearest(x, size or (2 * x.shape[1], 2 * x.shape[2])))


class Attention(nnx.Module):
    """diffusers' ``Attention`` with the default processor.

    Token input ``[B, N, C]``; an NHWC image is flattened to tokens and restored. The VAE
    variant has ``norm_num_groups`` (a GroupNorm before the projections) and
    ``residual_connection``.
    """

    def __init__(self, query_dim, cross_attention_dim=None, heads=8, dim_head=64, bias=False,
                 out_bias=True, norm_num_groups=None, eps=1e-5, residual_connection=False,
                 rescale_output_factor=1.0, *, attention="auto", dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.group_norm = (group_norm(query_dim, norm_num_groups, eps, **kw)
                           if norm_num_groups else None)
        self.to_q = linear(query_dim, inner, bias, **kw)
        self.to_k = linear(kv_dim, inner, bias, **kw)
        self.to_v = linear(kv_dim, inner, bias, **kw)
        self.to_out = nnx.List([linear(inner, query_dim, out_bias, **kw), Identity()])
        self.heads, self.dim_head = heads, dim_head
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.attention = attention

    def __call__(self, x, context=None, attention=None):
        shape = x.shape
        if x.ndim == 4:
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        b = x.shape[0]
        q = self.to_q(x).reshape(b, -1, self.heads, self.dim_head)
        k = self.to_k(context).reshape(b, -1, self.heads, self.dim_head)
        v = self.to_v(context).reshape(b, -1, self.heads, self.dim_head)
        out = dot_product_attention(q, k, v, implementation=attention or self.attention)
        out = self.to_out[0](out.reshape(b, -1, self.heads * self.dim_head))
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out.reshape(shape) if len(shape) == 4 else out


class GEGLU(nnx.Module):
    def __init__(self, dim_in, dim_out, *, dtype, param_dtype, rngs):
        self.proj = linear(dim_in, 2 * dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """``ff.net = [GEGLU, Dropout, Linear]`` as in diffusers (``activation_fn="geglu"``)."""

    def __init__(self, dim, mult=4, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, **kw), Identity(), linear(inner, dim, **kw)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))
