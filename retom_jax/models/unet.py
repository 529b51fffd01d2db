"""UNet2DConditionModel for SD1.x, SD2.x and SDXL in Flax NNX, with token merging.

Module and attribute names follow diffusers, so a checkpoint's keys map through the short
table in ``weights.py``. Internally NHWC; the public call takes and returns NCHW.

Token merging (``merge=ToMe(...) | ReToM(...) | ToDo(...)``) happens inside
``BasicTransformerBlock`` at the levels the config selects, exactly where tomesd does it:
the plan comes from the block's input, each enabled branch is merged after its norm and
unmerged before its residual add. ``MergeContext`` hands each block its plan and collects
the state ReToM carries from one denoising step to the next.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .. import sharding
from . import weights
from .attention import check_implementation
from ..merge.interface import BlockMerge, MergeMethod, level_grid, level_of
from .layers import Attention, Downsample2D, FeedForward, ResnetBlock2D, TimestepEmbedding, Upsample2D, conv, group_norm, layer_norm, linear, timestep_embedding
from .attention import target as attention_target

# --------------------------------------------------------------------------- config

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
# Options we do not implement, with the values that mean "off" in diffusers.
_OFF = {
    "class_embed_type": (None,), "num_class_embeds": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_cond_proj_dim": (None,), "timestep_post_act": (None,),
    "time_embedding_act_fn": (None,), "resnet_time_scale_shift": ("default",),
    "dual_cross_attention": (False,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,), "cross_attention_norm": (None,), "act_fn": ("silu",),
    "center_input_sample": (False,), "mid_block_only_cross_attention": (None, False),
}


MAX_SAMPLE_SIZE = 2048  # latent pixels a side (16384 image pixels)
MAX_LEVELS, MAX_LAYERS, MAX_CHANNELS = 16, 64, 65536


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_fields(cfg: dict):
    """The types and ranges of the fields that shape the model (ValueError naming the
    field), so that a malformed config.json fails here and not deep in the model."""
    def fail(name, what):
        raise ValueError(f"{name} must be {what}, got {cfg[name]!r}")

    def ints(name, one_ok=True):  # a positive int, or a list of them
        if name not in cfg:
            return
        v = cfg[name]
        if one_ok and _is_pos_int(v):
            return
        if not (isinstance(v, (list, tuple)) and v and all(_is_pos_int(x) for x in v)):
            fail(name, ("a positive integer or " if one_ok else "")
                 + "a non-empty list of positive integers")

    for name in ("in_channels", "out_channels", "norm_num_groups", "conv_in_kernel",
                 "conv_out_kernel"):
        if name in cfg and not _is_pos_int(cfg[name]):
            fail(name, "a positive integer")
    ints("block_out_channels", one_ok=False)
    for name in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim",
                 "num_attention_heads", "attention_head_dim"):
        if cfg.get(name) is not None:
            ints(name)
    for name in ("down_block_types", "up_block_types"):
        v = cfg.get(name)
        if name in cfg and not (isinstance(v, (list, tuple)) and v and all(isinstance(t, str) for t in v)):
            fail(name, "a non-empty list of block names")
    channels = cfg.get("block_out_channels", list(UNetConfig.block_out_channels))
    for name in ("down_block_types", "up_block_types"):
        n = len(cfg.get(name, getattr(UNetConfig, name)))
        if n != len(channels):
            raise ValueError(f"{name} has {n} entries but block_out_channels "
                             f"has {len(channels)}")
    groups = cfg.get("norm_num_groups", UNetConfig.norm_num_groups)
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"norm_num_groups={groups} does not divide "
                         f"block_out_channels {bad}")
    size = cfg.get("sample_size")
    if size is not None and not _is_pos_int(size) and not (
            isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_pos_int(x) for x in size)):
        fail("sample_size", "a positive integer (latent pixels), a [height, width] pair "
                            "or null")
    # Bounds that keep a hostile config from building a model without end or from sizing
    # a default image no device holds (the largest real UNets are far inside them).
    sides = size if isinstance(size, (list, tuple)) else [size]
    if any(v is not None and v > MAX_SAMPLE_SIZE for v in sides):
        fail("sample_size", f"at most {MAX_SAMPLE_SIZE} latent pixels a side")
    if len(channels) > MAX_LEVELS:
        fail("block_out_channels", f"at most {MAX_LEVELS} levels")
    for name in ("layers_per_block", "transformer_layers_per_block"):
        v = cfg.get(name)
        if any(x > MAX_LAYERS for x in (v if isinstance(v, (list, tuple)) else [v or 0])):
            fail(name, f"at most {MAX_LAYERS}")
    if max(channels) > MAX_CHANNELS:
        fail("block_out_channels", f"at most {MAX_CHANNELS} channels a level")


def _per_level(value, n, name):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} blocks")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"per-layer nested {name} is not supported")
        return tuple(value)
    return (value,) * n


# Fields with one value per level (a single value in config.json means every level).
_PER_LEVEL = ("layers_per_block", "transformer_layers_per_block", "num_attention_heads",
              "cross_attention_dim")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers ``UNet2DConditionModel`` config that shape the model,
    with diffusers' defaults. The per-level fields (``layers_per_block``,
    ``transformer_layers_per_block``, ``num_attention_heads``, ``cross_attention_dim``,
    ``reverse_transformer_layers_per_block``) take one value or one per level and are
    stored per level."""
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | None = None
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    num_attention_heads: int | tuple = 8
    cross_attention_dim: int | tuple = 1280
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        n = len(self.down_block_types)
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in _PER_LEVEL:
            object.__setattr__(self, name, _per_level(getattr(self, name), n, name))
        if self.reverse_transformer_layers_per_block is not None:
            object.__setattr__(self, "reverse_transformer_layers_per_block", _per_level(
                self.reverse_transformer_layers_per_block, n,
                "reverse_transformer_layers_per_block"))

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "UNet config") -> "UNetConfig":
        """Read a diffusers ``config.json`` dict; a ``CheckpointError`` starting with
        ``where`` when it is not a UNet this port implements."""
        with weights.config_errors(where):
            if not isinstance(cfg, dict):
                raise ValueError(f"must be a JSON object, got {type(cfg).__name__}")
            name = cfg.get("_class_name", "UNet2DConditionModel")
            if name != "UNet2DConditionModel":
                raise ValueError(f"this config describes a {name}, not a UNet2DConditionModel")
            _check_fields(cfg)
            for key, off in _OFF.items():
                if cfg.get(key, off[0]) not in off:
                    raise ValueError(f"{key}={cfg[key]!r} is not supported (retom-jax covers "
                                     f"the SD1.x, SD2.x and SDXL UNets)")
            for kind, allowed in (("down_block_types", _DOWN), ("up_block_types", _UP)):
                for t in cfg.get(kind, getattr(cls, kind)):
                    if t not in allowed:
                        raise ValueError(f"{kind} entry {t!r} is not supported; supported: "
                                         f"{allowed}")
            if cfg.get("mid_block_type", cls.mid_block_type) not in (cls.mid_block_type, None):
                raise ValueError(f"mid_block_type {cfg['mid_block_type']!r} is not supported")
            if cfg.get("addition_embed_type") not in (None, "text_time"):
                raise ValueError(f"addition_embed_type {cfg['addition_embed_type']!r} is not "
                                 f"supported (None or 'text_time')")
            only_cross = cfg.get("only_cross_attention", False)
            if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
                raise ValueError("only_cross_attention is not supported")
            kwargs = weights.config_fields(cls, cfg)
            kwargs.pop("only_cross_attention", None)
            kwargs.pop("num_attention_heads", None)
            # diffusers' misnomer: SD1.x/2.x configs give the head count as attention_head_dim
            heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
            if heads is not None:
                kwargs["num_attention_heads"] = tuple(heads) if isinstance(heads, list) else heads
            for name in ("use_linear_projection", "upcast_attention"):
                if name in kwargs:
                    kwargs[name] = bool(kwargs[name])
            return cls(**kwargs)

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1

    def attention_downsamples(self) -> tuple[int, ...]:
        """Downsample factors (1, 2, 4, ...) of the levels that have transformer blocks."""
        levels = {2 ** i for i, t in enumerate(self.down_block_types) if t.startswith("CrossAttn")}
        if self.mid_block_type is not None:
            levels.add(2 ** (len(self.down_block_types) - 1))
        return tuple(sorted(levels))


# --------------------------------------------------------------------------- merging seam

class MergeContext:
    """Trace-time helper of one UNet call: hands each transformer block the ``BlockMerge``
    its merging method gives it (``MergeMethod.for_block``) and collects the caches the
    method carries to the next call, keyed by the block's path in the model.
    ``state``: ``{"step", "blocks": {path: cache}}`` from the previous call, or None.
    ``reuse`` (static): whether the cache is reused; None lets the step counter decide."""

    def __init__(self, method, latent_hw, paths, key=None, state=None, reuse=None):
        self.method, self.latent_hw, self.paths = method, latent_hw, paths
        self.key, self.state = key, state
        self.new_blocks = {}
        self.count = 0
        self.use_cache = False
        if state is not None:
            # A static ``reuse`` lets XLA drop the selection work it makes unnecessary;
            # otherwise the step counter in the state decides at run time.
            self.use_cache = method.use_cache(state["step"]) if reuse is None else reuse

    def block(self, module, x, hw) -> BlockMerge:
        index, self.count = self.count, self.count + 1
        downsample = level_of(self.latent_hw, x.shape[1])
        if not self.method.applies(downsample):
            return BlockMerge()
        path = self.paths[id(module)]
        key = None if self.key is None else jax.random.fold_in(self.key, index)
        cache = None
        if self.state is not None and self.method.carries_cache:
            cache = self.state["blocks"][path]
        merge, new = self.method.for_block(x, hw, downsample, key, cache, self.use_cache)
        if new is not None:
            self.new_blocks[path] = new
        return merge

    def new_state(self):
        """The state for the next call. Blocks this call did not run (a step-cached call
        runs only the outer levels) keep the cache they had."""
        if self.state is None:
            return {"step": jnp.zeros((), jnp.int32) + 1, "blocks": self.new_blocks}
        blocks = {**self.state["blocks"], **self.new_blocks} if self.state["blocks"] else (
            self.new_blocks)
        return {"step": self.state["step"] + 1, "blocks": blocks}


class CachedOutput(NamedTuple):
    """What ``UNet.apply_cached`` returns: ``sample`` (NCHW), ``merge_state`` (as in
    ``UNetOutput``) and ``feature``, the NHWC activations that enter the outermost
    ``depth`` up blocks: computed by a full call, passed through by a shallow one."""
    sample: jax.Array
    merge_state: Any
    feature: jax.Array


class UNetOutput(NamedTuple):
    """What a UNet call returns: ``sample``, the prediction (NCHW), and ``merge_state``,
    the state to pass to the next call when the merging method carries one
    (``ReToM(cache_step=...)``), else None."""
    sample: jax.Array
    merge_state: Any = None


# --------------------------------------------------------------------------- blocks

class BasicTransformerBlock(nnx.Module):
    def __init__(self, dim, heads, head_dim, cross_dim, *, attention, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, 1e-5, **kw)
        self.attn1 = Attention(dim, None, heads, head_dim, attention=attention, **kw)
        self.norm2 = layer_norm(dim, 1e-5, **kw)
        self.attn2 = Attention(dim, cross_dim, heads, head_dim, attention=attention, **kw)
        self.norm3 = layer_norm(dim, 1e-5, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x, context, hw, ctx: MergeContext | None, attention=None):
        bm = ctx.block(self, x, hw) if ctx is not None else BlockMerge()
        (m_a, u_a), (m_c, u_c), (m_m, u_m) = bm.attn, bm.crossattn, bm.mlp

        h = m_a(self.norm1(x))
        kv = bm.kv_down(h) if bm.kv_down is not None else None
        x = u_a(self.attn1(h, kv, attention=attention)) + x
        x = u_c(self.attn2(m_c(self.norm2(x)), context, attention=attention)) + x
        x = u_m(self.ff(m_m(self.norm3(x)))) + x
        return x


class Transformer2DModel(nnx.Module):
    def __init__(self, heads, head_dim, channels, num_layers, cross_dim, groups,
                 linear_projection, *, attention, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * head_dim
        self.norm = group_norm(channels, groups, 1e-6, **kw)
        proj = (lambda a, b: linear(a, b, **kw)) if linear_projection else (
            lambda a, b: conv(a, b, kernel=1, **kw))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, head_dim, cross_dim, attention=attention, **kw)
            for _ in range(num_layers)])
        self.proj_out = proj(inner, channels)
        self.linear_projection = linear_projection

    def __call__(self, x, context, ctx=None, attention=None):
        b, h, w, c = x.shape
        residual = x
        x = self.norm(x)
        if self.linear_projection:
            x = self.proj_in(x.reshape(b, h * w, c))
        else:
            x = self.proj_in(x)
            x = x.reshape(b, h * w, x.shape[-1])
        for block in self.transformer_blocks:
            x = block(x, context, (h, w), ctx, attention)
        if self.linear_projection:
            x = self.proj_out(x).reshape(b, h, w, c)
        else:
            x = self.proj_out(x.reshape(b, h, w, x.shape[-1]))
        return x + residual


class DownBlock(nnx.Module):
    """``CrossAttnDownBlock2D`` (with ``attentions``) or ``DownBlock2D`` (without)."""

    def __init__(self, cfg: UNetConfig, i, cin, cout, temb, *, attention, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n = cfg.layers_per_block[i]
        res = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, temb, **res, **kw)
                                 for j in range(n)])
        heads = cfg.num_attention_heads[i]
        self.attentions = nnx.List([
            Transformer2DModel(heads, cout // heads, cout, cfg.transformer_layers_per_block[i],
                               cfg.cross_attention_dim[i], cfg.norm_num_groups,
                               cfg.use_linear_projection, attention=attention, **kw)
            for _ in range(n)]) if cfg.down_block_types[i].startswith("CrossAttn") else None
        self.downsamplers = (nnx.List([Downsample2D(cout, cout, cfg.downsample_padding, **kw)])
                             if i < len(cfg.block_out_channels) - 1 else None)

    def __call__(self, x, temb, context, ctx, attention, downsample=True):
        """``downsample=False`` leaves out the downsampler (a shallow step-cached call:
        only the deeper levels, which it does not run, read its output)."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, ctx, attention)
            skips.append(x)
        if self.downsamplers is not None and downsample:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nnx.Module):
    """``CrossAttnUpBlock2D`` or ``UpBlock2D``: resnets over concatenated skips."""

    def __init__(self, cfg: UNetConfig, i, prev, cout, skip_in, temb, *, attention, dtype,
                 param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev = lambda t: tuple(reversed(t))  # noqa: E731
        n = rev(cfg.layers_per_block)[i] + 1
        res = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        self.resnets = nnx.List([
            ResnetBlock2D((prev if j == 0 else cout) + (skip_in if j == n - 1 else cout), cout,
                          temb, **res, **kw) for j in range(n)])
        heads = rev(cfg.num_attention_heads)[i]
        layers = (cfg.reverse_transformer_layers_per_block
                  or rev(cfg.transformer_layers_per_block))[i]
        self.attentions = nnx.List([
            Transformer2DModel(heads, cout // heads, cout, layers, rev(cfg.cross_attention_dim)[i],
                               cfg.norm_num_groups, cfg.use_linear_projection,
                               attention=attention, **kw)
            for _ in range(n)]) if cfg.up_block_types[i].startswith("CrossAttn") else None
        self.upsamplers = (nnx.List([Upsample2D(cout, cout, **kw)])
                           if i < len(cfg.block_out_channels) - 1 else None)

    def __call__(self, x, skips, temb, context, ctx, attention, size=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, ctx, attention)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class UNetMidBlock2DCrossAttn(nnx.Module):
    def __init__(self, cfg: UNetConfig, temb, *, attention, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c = cfg.block_out_channels[-1]
        heads = cfg.num_attention_heads[-1]
        res = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                   output_scale_factor=cfg.mid_block_scale_factor)
        self.attentions = nnx.List([Transformer2DModel(
            heads, c // heads, c, cfg.transformer_layers_per_block[-1], cfg.cross_attention_dim[-1],
            cfg.norm_num_groups, cfg.use_linear_projection, attention=attention, **kw)])
        self.resnets = nnx.List([ResnetBlock2D(c, c, temb, **res, **kw) for _ in range(2)])

    def __call__(self, x, temb, context, ctx, attention):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, ctx, attention)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nnx.Module):
    """The NNX module. Use ``UNet`` (from ``load_unet``) for the NCHW public call."""

    def __init__(self, cfg: UNetConfig, *, attention="auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch = cfg.block_out_channels
        temb = ch[0] * 4
        self.config = cfg
        self.conv_in = conv(cfg.in_channels, ch[0], cfg.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], temb, **kw)
        self.add_embedding = (
            TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb, **kw)
            if cfg.addition_embed_type == "text_time" else None)
        self.down_blocks = nnx.List([
            DownBlock(cfg, i, ch[max(i - 1, 0)], ch[i], temb, attention=attention, **kw)
            for i in range(len(ch))])
        self.mid_block = (UNetMidBlock2DCrossAttn(cfg, temb, attention=attention, **kw)
                          if cfg.mid_block_type else None)
        rch = tuple(reversed(ch))
        self.up_blocks = nnx.List([
            UpBlock(cfg, i, rch[max(i - 1, 0)], rch[i], rch[min(i + 1, len(ch) - 1)], temb,
                    attention=attention, **kw)
            for i in range(len(ch))])
        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = conv(ch[0], cfg.out_channels, cfg.conv_out_kernel, **kw)
        self.dtype = dtype

    def __call__(self, sample, timesteps, context, text_embeds=None, time_ids=None,
                 ctx: MergeContext | None = None, attention=None, constrain=None,
                 depth: int | None = None, feature=None):
        """``constrain``: applied to the NHWC activations between blocks (a mesh's
        ``with_sharding_constraint``, see ``sharding.activation_constraint``).

        Step caching (``depth``, static): a full call (``feature=None``) returns
        ``(out, feature)``, ``feature`` being what enters ``up_blocks[-depth]``; a shallow
        call (``feature`` given) runs ``conv_in``, the first ``depth`` down blocks (the
        last without its downsampler), then ``feature`` through the last ``depth`` up
        blocks with those blocks' skips, and returns ``(out, feature)``."""
        cfg = self.config
        constrain = constrain or (lambda x: x)
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(emb.astype(self.dtype))
        if self.add_embedding is not None:
            tids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                      cfg.flip_sin_to_cos, cfg.freq_shift).reshape(b, -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), tids], axis=-1)
            emb = emb + self.add_embedding(add.astype(self.dtype))

        levels = len(self.down_blocks)
        shallow = feature is not None
        if depth is not None and not 1 <= depth <= levels:
            raise ValueError(f"step cache depth must be 1..{levels} for this UNet, got {depth}")
        x = constrain(self.conv_in(constrain(sample)))
        skips = [x]
        for i, block in enumerate(self.down_blocks[:depth] if shallow else self.down_blocks):
            x, s = block(x, emb, context, ctx, attention,
                         downsample=not (shallow and i == depth - 1))
            x = constrain(x)
            skips.extend(s)
        first_up = levels - depth if depth is not None else 0
        if shallow:
            if ctx is not None:  # the outer up blocks draw the keys they draw in a full call
                ctx.count = _transformer_blocks(self, first_up)
            x = feature
        elif self.mid_block is not None:
            x = constrain(self.mid_block(x, emb, context, ctx, attention))
        up_factor = 2 ** cfg.num_upsamplers
        odd = any(d % up_factor for d in sample.shape[1:3])
        for k, block in enumerate(self.up_blocks):
            if k < first_up and shallow:
                continue
            if k == first_up and depth is not None:
                feature = x
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if (odd and skips) else None
            x = constrain(block(x, mine, emb, context, ctx, attention, size))
        x = jax.nn.silu(self.conv_norm_out(x))
        out = self.conv_out(x)
        return out if depth is None else (out, feature)


def _transformer_blocks(model: UNet2DConditionModel, first_up: int) -> int:
    """How many transformer blocks a full call runs before ``up_blocks[first_up]``."""
    parts = list(model.down_blocks) + [model.mid_block] + list(model.up_blocks[:first_up])
    return sum(isinstance(m, BasicTransformerBlock)
               for part in parts if part is not None for _, m in nnx.iter_modules(part))


# --------------------------------------------------------------------------- public wrapper

class UNet:
    """A loaded UNet: ``unet(sample, timesteps, encoder_hidden_states, added_cond_kwargs)``.

    ``unet.apply(params, ...)`` is the pure function underneath (use it inside your own
    ``jax.jit`` so the parameters are arguments, not constants); ``unet(...)`` calls a jitted
    ``apply`` with ``unet.params``. Arrays are NCHW like diffusers.
    """

    def __init__(self, config: UNetConfig, graphdef, params, dtype, attention="auto", mesh=None):
        self.config, self.graphdef, self.params = config, graphdef, params
        self.dtype = dtype
        self.mesh = mesh  # a jax.sharding.Mesh: activations sharded (batch, rows) on it
        self.attention = check_implementation(attention)
        self._jitted = jax.jit(self.apply, static_argnames=("merge", "attention", "reuse"))

    # -- validation (Python, before tracing)
    def check_inputs(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None,
                     merge=None, merge_state=None, key=None):
        cfg = self.config
        if getattr(sample, "ndim", None) != 4:
            raise ValueError(f"sample must be NCHW [batch, {cfg.in_channels}, height, width], "
                             f"got shape {getattr(sample, 'shape', None)}")
        b, c, h, w = sample.shape
        if c != cfg.in_channels:
            raise ValueError(f"sample has {c} channels, the UNet expects {cfg.in_channels}")
        ehs = encoder_hidden_states
        if getattr(ehs, "ndim", None) != 3 or ehs.shape[-1] != cfg.cross_attention_dim[0]:
            raise ValueError(
                f"encoder_hidden_states must be [batch, tokens, {cfg.cross_attention_dim[0]}], "
                f"got shape {getattr(ehs, 'shape', None)}")
        if ehs.shape[0] != b:
            raise ValueError(f"encoder_hidden_states has batch {ehs.shape[0]}, sample has {b}")
        t = jnp.shape(timesteps)
        if t not in ((), (1,), (b,)):
            raise ValueError(f"timesteps must be a scalar or have shape [{b}], got {t}")
        if cfg.addition_embed_type == "text_time":
            if not added_cond_kwargs or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
                raise ValueError("this is an SDXL UNet: pass added_cond_kwargs={'text_embeds': "
                                 "[batch, D], 'time_ids': [batch, 6]}")
            te, ti = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            width = cfg.projection_class_embeddings_input_dim - cfg.addition_time_embed_dim * ti.shape[-1]
            if te.shape != (b, width):
                raise ValueError(f"added_cond_kwargs['text_embeds'] must be [{b}, {width}], "
                                 f"got {tuple(te.shape)}")
            if ti.ndim != 2 or ti.shape[0] != b:
                raise ValueError(f"added_cond_kwargs['time_ids'] must be [{b}, n], got {tuple(ti.shape)}")
        if merge is not None:
            self.check_merge(merge, (h, w), key=key, merge_state=merge_state)
            merge.check_state(merge_state)

    def check_merge(self, merge, latent_hw, key=None, merge_state=None):
        """Raise ValueError if ``merge`` cannot run on this UNet at this latent size."""
        if not isinstance(merge, MergeMethod):
            raise ValueError(f"merge must be ToMe, ReToM or ToDo (or None; any "
                             f"retom_jax.merge.MergeMethod), got {merge!r}")
        merge.check({d: level_grid(latent_hw, d) for d in self.config.attention_downsamples()},
                    key)
        if merge_state is not None:
            merge.check_state(merge_state)

    def init_merge_state(self, sample_shape, encoder_hidden_states_shape, merge,
                         added_cond_kwargs=None):
        """Zero state for a sampling loop with ``ReToM(cache_step=...)``: pass it as
        ``merge_state`` to the first call and the returned state to each next call."""
        if merge is None or not merge.carries_cache:
            raise ValueError("init_merge_state needs ReToM(cache_step=...): nothing else carries state")
        spec = lambda s: jax.ShapeDtypeStruct(s, self.dtype)  # noqa: E731
        added = None if added_cond_kwargs is None else jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), added_cond_kwargs)
        out = jax.eval_shape(  # without a state, each block reports the cache it would leave
            lambda p, s, e, a: self._forward(p, s, jnp.zeros(()), e, a, merge=merge),
            self.params, spec(sample_shape), spec(encoder_hidden_states_shape), added)
        return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), out.merge_state)

    # -- pure function
    def apply(self, params, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None,
              *, merge=None, merge_state=None, key=None, attention=None,
              reuse=None) -> UNetOutput:
        """The pure UNet call (see the class docstring): ``UNetOutput(sample, merge_state)``.

        ``merge_state``: for ``ReToM(cache_step=...)``, the state from ``init_merge_state``
        or the previous call (the output carries the next one). ``reuse`` (static): None
        decides from the state's step counter whether the cached selection is reused;
        True/False fixes it at trace time, so that a loop split at ``cache_step`` compiles
        the steps after it without the fresh selection work.
        """
        if merge is not None:
            merge.check_state(merge_state)
        return self._forward(params, sample, timesteps, encoder_hidden_states,
                             added_cond_kwargs, merge=merge, merge_state=merge_state, key=key,
                             attention=attention, reuse=reuse)

    def apply_cached(self, params, sample, timesteps, encoder_hidden_states,
                     added_cond_kwargs=None, *, depth: int, feature=None, merge=None,
                     merge_state=None, key=None, attention=None,
                     reuse=None) -> CachedOutput:
        """``apply`` for step caching (DeepCache): ``CachedOutput(sample, merge_state,
        feature)``. ``depth`` (static, 1..levels): how many outer down/up blocks a shallow
        call runs. ``feature=None``: a full call, which also returns the feature that
        enters the outermost ``depth`` up blocks (NHWC ``[batch, h, w, C]`` at that
        level); with ``feature`` (from an earlier full call at the same batch and size): a
        shallow call, the down/mid/up blocks deeper than ``depth`` replaced by it.
        ``feature_shape`` gives its shape. A method's cache (``merge_state``) keeps the
        entries of the blocks a shallow call does not run."""
        if merge is not None:
            merge.check_state(merge_state)
        return self._forward(params, sample, timesteps, encoder_hidden_states,
                             added_cond_kwargs, merge=merge, merge_state=merge_state, key=key,
                             attention=attention, reuse=reuse, depth=depth, feature=feature)

    def feature_shape(self, sample_shape, depth: int) -> tuple:
        """The NHWC shape of ``apply_cached``'s feature for an NCHW ``sample_shape``."""
        levels = len(self.config.block_out_channels)
        if not 1 <= depth <= levels:
            raise ValueError(f"step cache depth must be 1..{levels} for this UNet, got {depth}")
        b, _, h, w = sample_shape
        for _ in range(depth - 1):  # the down path's sizes (3x3 stride-2 convolutions)
            h, w = (h + 1) // 2, (w + 1) // 2
        # what up_blocks[levels - depth - 1] puts out (the mid block's when depth == levels)
        channels = tuple(reversed(self.config.block_out_channels))[max(levels - depth - 1, 0)]
        return (b, h, w, channels)

    def _forward(self, params, sample, timesteps, encoder_hidden_states, added_cond_kwargs,
                 *, merge=None, merge_state=None, key=None, attention=None, reuse=None,
                 depth=None, feature=None):
        """``apply`` without the state check: without ``merge_state`` a method that carries
        a cache plans afresh and returns the state a first step leaves."""
        model = nnx.merge(self.graphdef, params)
        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        ctx = None
        if merge is not None:
            paths = {id(m): ".".join(map(str, p)) for p, m in nnx.iter_modules(model)
                     if isinstance(m, BasicTransformerBlock)}
            ctx = MergeContext(merge, x.shape[1:3], paths, key=key, state=merge_state,
                               reuse=reuse)
        added = added_cond_kwargs or {}
        with attention_target(self.mesh):  # kernels for the mesh's platform, per shard
            out = model(x, timesteps, encoder_hidden_states.astype(self.dtype),
                        added.get("text_embeds"), added.get("time_ids"), ctx,
                        attention or self.attention, sharding.activation_constraint(self.mesh),
                        depth, None if feature is None else feature.astype(self.dtype))
        if depth is not None:
            out, feature = out
        out = jnp.transpose(out, (0, 3, 1, 2))
        carried = merge is not None and merge.carries_cache
        state = ctx.new_state() if carried else None
        if depth is not None:
            return CachedOutput(out, state, feature)
        return UNetOutput(out, state)

    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None, *,
                 merge=None, merge_state=None, key=None, attention=None, reuse=None):
        self.check_inputs(sample, timesteps, encoder_hidden_states, added_cond_kwargs,
                          merge=merge, merge_state=merge_state, key=key)
        if attention is not None:
            check_implementation(attention)
        return self._jitted(self.params, sample, timesteps, encoder_hidden_states,
                            added_cond_kwargs, merge=merge, merge_state=merge_state, key=key,
                            attention=attention, reuse=reuse)


def load_unet(path_or_repo_id, dtype=jnp.float32, param_dtype=None, *, subfolder="unet",
              variant=None, attention="auto", mesh=None) -> UNet:
    """Load a diffusers ``UNet2DConditionModel`` folder (or a pipeline folder's ``unet/``,
    or a repo id in the local Hugging Face cache) into a Flax ``UNet``.

    ``dtype`` is the activation dtype, ``param_dtype`` the stored weights' dtype (defaults
    to ``dtype``). ``variant="fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors``;
    without it the full-precision file is preferred and the fp16 one is used if alone.
    ``mesh``: place the parameters on this ``jax.sharding.Mesh`` by
    ``sharding.LOGICAL_AXIS_RULES``, each device's shard read from the file.
    """
    dtype, param_dtype = weights.dtypes(dtype, param_dtype)
    check_implementation(attention)
    folder, config = weights.read_model_config(path_or_repo_id, subfolder, UNetConfig)
    graphdef, params = weights.load_module(
        folder, lambda rngs: UNet2DConditionModel(
            config, attention=attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        param_dtype, stem="diffusion_pytorch_model", variant=variant, mesh=mesh)
    return UNet(config, graphdef, params, dtype, attention, mesh)


def init_unet(config: UNetConfig | dict, seed: int = 0, dtype=jnp.float32, param_dtype=None,
              attention="auto") -> UNet:
    """A UNet with random weights (benchmarks, demos): same structure as a checkpoint's,
    values from `weights.random_state`."""
    if isinstance(config, dict):
        config = UNetConfig.from_dict(config)
    dtype, param_dtype = weights.dtypes(dtype, param_dtype)
    graphdef, params = weights.random_params(lambda rngs: UNet2DConditionModel(
        config, attention=attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        param_dtype, seed)
    return UNet(config, graphdef, params, dtype, attention)
