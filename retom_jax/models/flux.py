"""Flux.1's ``FluxTransformer2DModel`` in Flax NNX, with token merging in every block.

Names follow diffusers (``transformer_blocks`` are the double-stream blocks,
``single_transformer_blocks`` the single-stream ones), so a checkpoint's keys map through
``weights.RENAME``. Tokens are ``[batch, tokens, channels]``: ``hidden_states`` is the
packed latent (2x2 patches of the 16-channel latent, 64 channels for Flux.1), one token
per cell of an ``(h, w)`` grid in row-major order.

Rotary position embedding: every token has an id ``(t, row, col)`` (text tokens ``0, 0,
0``, image tokens ``0, row, col``); head channels are split into ``axes_dims_rope`` groups,
one per id axis, each rotated by ``id * theta ** (-2i / dim)``, on queries and keys.

Token merging (``merge=ToMe(...) | ReToM(...) | ToDo(...)``): only image tokens are
merged; text tokens always pass whole. In each block the plan comes from the block's input
image tokens (``MergeMethod.for_block``). Double-stream block: the image stream's
normalised tokens are merged before attention (and before the MLP when ``merge_mlp``), the
joint attention runs over ``text + merged image`` tokens, and outputs are unmerged before
each gated residual add. Single-stream block: attention and MLP read the same normalised
tokens and share one output projection; with both merged the projection runs on merged
tokens and its output is unmerged, otherwise each merged branch is unmerged before the
projection. ToDo pools the image keys/values (and their positions) only.

Positions of merged tokens: a merged slot's RoPE id is the mean of the ids of the tokens
averaged into it, i.e. the very merge applied to its features applied to the positions
(``merge(ids)``; for ToDo the keys' ids are pooled as the keys are). So every method works
through the same ``(merge, unmerge)`` pair without model-specific hooks, an unmerged token
keeps its exact position, and a merged slot sits at the centre of the tokens it stands
for (RoPE is a smooth function of the position, so fractional ids are well defined).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import weights
from .. import sharding
from .attention import check_implementation, dot_product_attention
from .attention import target as attention_target
from .layers import Identity, TimestepEmbedding, linear, timestep_embedding
from ..merge import BlockMerge, MergeMethod
from .unet import MergeContext

# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """The fields of a diffusers ``FluxTransformer2DModel`` config, diffusers' defaults
    (Flux.1-dev/schnell differ only in ``guidance_embeds``)."""
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        for name in ("in_channels", "num_attention_heads", "attention_head_dim",
                     "joint_attention_dim", "pooled_projection_dim", "patch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(
                d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {list(self.axes_dims_rope)} must be even and add "
                             f"up to attention_head_dim={self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size ** 2 * (self.out_channels or self.in_channels)

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "Flux config") -> "FluxConfig":
        with weights.config_errors(where):
            if not isinstance(cfg, dict):
                raise ValueError(f"must be a JSON object, got {type(cfg).__name__}")
            name = cfg.get("_class_name", "FluxTransformer2DModel")
            if name != "FluxTransformer2DModel":
                raise ValueError(f"this config describes a {name}, not a FluxTransformer2DModel")
            return cls(**weights.config_fields(cls, cfg))


# --------------------------------------------------------------------------- RoPE


def rope(ids, axes_dims, theta: float = 10000.0):
    """``(cos, sin)`` of ids ``[..., L, n_axes]`` -> each ``[..., L, sum(axes_dims)]``
    (every frequency repeated twice, for the interleaved pairs it rotates)."""
    pos = ids.astype(jnp.float32)
    cos, sin = [], []
    for i, dim in enumerate(axes_dims):
        freqs = (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
        angle = pos[..., i, None] * freqs
        cos.append(jnp.repeat(jnp.cos(angle), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(angle), 2, axis=-1))
    return jnp.concatenate(cos, -1), jnp.concatenate(sin, -1)


def apply_rope(x, cos_sin):
    """Rotate ``x [B, L, heads, D]`` by ``cos, sin [L, D]`` or ``[B, L, D]`` (pairs
    ``(x[2i], x[2i+1])`` as complex numbers), in float32."""
    cos, sin = cos_sin
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (xf * cos + rotated * sin).astype(x.dtype)


def _cat_rope(a, b):
    """Concatenate two ``(cos, sin)`` along tokens, broadcasting ``[L, D]`` to a batch."""
    if a[0].ndim == b[0].ndim:
        return tuple(jnp.concatenate([x, y], axis=-2) for x, y in zip(a, b))
    batch = (a[0] if a[0].ndim == 3 else b[0]).shape[0]
    up = lambda t: t if t.ndim == 3 else jnp.broadcast_to(t, (batch, *t.shape))  # noqa: E731
    return tuple(jnp.concatenate([up(x), up(y)], axis=-2) for x, y in zip(a, b))


# --------------------------------------------------------------------------- layers


def plain_norm(dim, eps=1e-6, *, dtype, param_dtype, rngs):
    """LayerNorm without scale or bias (statistics in float32)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_bias=False, use_scale=False, dtype=dtype,
                         param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)


class AdaNorm(nnx.Module):
    """diffusers' ``AdaLayerNormZero`` (``chunks=6``), ``AdaLayerNormZeroSingle`` (3) and
    ``AdaLayerNormContinuous`` (2): ``linear(silu(temb))`` cut into ``chunks`` vectors."""

    def __init__(self, dim, cond_dim, chunks, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear = linear(cond_dim, chunks * dim, **kw)
        self.norm = plain_norm(dim, **kw)
        self.chunks = chunks

    def __call__(self, temb):
        return jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1)


def modulate(norm, x, shift, scale):
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


class GELUProj(nnx.Module):
    def __init__(self, cin, cout, *, dtype, param_dtype, rngs):
        self.proj = linear(cin, cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    """``ff.net = [GELU(tanh) projection, Dropout, Linear]`` (``"gelu-approximate"``)."""

    def __init__(self, dim, mult=4, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.net = nnx.List([GELUProj(dim, dim * mult, **kw), Identity(),
                             linear(dim * mult, dim, **kw)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


def rms_norm(dim, eps, *, dtype, param_dtype, rngs):
    return nnx.RMSNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                       use_fast_variance=False, rngs=rngs)


class FluxAttention(nnx.Module):
    """diffusers' ``FluxAttention``: q/k/v projections with RMS-normalised heads; with
    ``added`` the text stream's own projections (``add_*_proj``, ``to_add_out``);
    ``pre_only`` (single-stream) has no output projection."""

    def __init__(self, dim, heads, head_dim, added=False, pre_only=False, eps=1e-6, *,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * head_dim
        self.norm_q = rms_norm(head_dim, eps, **kw)
        self.norm_k = rms_norm(head_dim, eps, **kw)
        self.to_q, self.to_k, self.to_v = (linear(dim, inner, **kw) for _ in range(3))
        self.to_out = None if pre_only else nnx.List([linear(inner, dim, **kw), Identity()])
        if added:
            self.norm_added_q = rms_norm(head_dim, eps, **kw)
            self.norm_added_k = rms_norm(head_dim, eps, **kw)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                linear(dim, inner, **kw) for _ in range(3))
            self.to_add_out = linear(inner, dim, **kw)
        self.heads, self.head_dim = heads, head_dim

    def _heads(self, x):
        return x.reshape(*x.shape[:2], self.heads, self.head_dim)

    def qkv(self, q_in, kv_in, added=False):
        """Projected, normalised ``(q, k, v)`` ``[B, L, heads, head_dim]`` of one stream."""
        if added:
            return (self.norm_added_q(self._heads(self.add_q_proj(q_in))),
                    self.norm_added_k(self._heads(self.add_k_proj(kv_in))),
                    self._heads(self.add_v_proj(kv_in)))
        return (self.norm_q(self._heads(self.to_q(q_in))),
                self.norm_k(self._heads(self.to_k(kv_in))), self._heads(self.to_v(kv_in)))


def joint_attention(text_qkv, image_qkv, rope_q, rope_k, attention):
    """Attention over ``text + image`` tokens: ``[B, T + M, heads * head_dim]``."""
    q, k, v = (jnp.concatenate([a, b], axis=1) for a, b in zip(text_qkv, image_qkv))
    out = dot_product_attention(apply_rope(q, rope_q), apply_rope(k, rope_k), v,
                                implementation=attention)
    return out.reshape(*out.shape[:2], -1)


class BlockInputs(NamedTuple):
    """What every block gets besides its tokens: ``temb [B, D]``, the text and image RoPE
    tables (``(cos, sin)``, ``[T, hd]`` / ``[N, hd]``), the image ids ``[B, N, 3]``
    (float32, what merging averages), the RoPE axes and the attention kernel."""
    temb: jax.Array
    rope_text: tuple
    rope_image: tuple
    image_ids: jax.Array
    axes: tuple
    attention: str


def merged_ropes(inp: BlockInputs, merge, kv_down):
    """The RoPE tables of the joint queries and keys of a block whose image queries are
    ``merge`` d and keys ``kv_down`` ed (None: the keys are the queries)."""
    def table(fn):
        if fn is None:
            return inp.rope_image
        return rope(fn(inp.image_ids), inp.axes)
    img_q = inp.rope_image if merge is _IDENTITY_MERGE else table(merge)
    img_k = img_q if kv_down is None else table(kv_down)
    return _cat_rope(inp.rope_text, img_q), _cat_rope(inp.rope_text, img_k)


_IDENTITY_MERGE = BlockMerge().attn[0]


class FluxTransformerBlock(nnx.Module):
    """Double-stream block: text and image streams with their own weights, one joint
    attention."""

    def __init__(self, dim, heads, head_dim, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = AdaNorm(dim, dim, 6, **kw)
        self.norm1_context = AdaNorm(dim, dim, 6, **kw)
        self.attn = FluxAttention(dim, heads, head_dim, added=True, **kw)
        self.norm2 = plain_norm(dim, **kw)
        self.ff = FeedForward(dim, **kw)
        self.norm2_context = plain_norm(dim, **kw)
        self.ff_context = FeedForward(dim, **kw)

    def __call__(self, x, c, inp: BlockInputs, bm: BlockMerge):
        (m_a, u_a), (m_m, u_m) = bm.attn, bm.mlp
        shift, scale, gate, shift2, scale2, gate2 = self.norm1(inp.temb)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(inp.temb)
        nx = modulate(self.norm1.norm, x, shift, scale)
        nc = modulate(self.norm1_context.norm, c, c_shift, c_scale)
        hq = m_a(nx)
        hk = bm.kv_down(nx) if bm.kv_down is not None else hq
        rope_q, rope_k = merged_ropes(inp, m_a, bm.kv_down)
        out = joint_attention(self.attn.qkv(nc, nc, added=True), self.attn.qkv(hq, hk),
                              rope_q, rope_k, inp.attention)
        t = c.shape[1]
        x = x + gate[:, None] * u_a(self.attn.to_out[0](out[:, t:]))
        c = c + c_gate[:, None] * self.attn.to_add_out(out[:, :t])
        x = x + gate2[:, None] * u_m(self.ff(m_m(modulate(self.norm2, x, shift2, scale2))))
        c = c + c_gate2[:, None] * self.ff_context(modulate(self.norm2_context, c, c_shift2,
                                                            c_scale2))
        return x, c


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block: text and image tokens through one set of weights, attention
    and MLP side by side into one output projection."""

    def __init__(self, dim, heads, head_dim, mlp_ratio=4.0, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = int(dim * mlp_ratio)
        self.norm = AdaNorm(dim, dim, 3, **kw)
        self.proj_mlp = linear(dim, hidden, **kw)
        self.proj_out = linear(dim + hidden, dim, **kw)
        self.attn = FluxAttention(dim, heads, head_dim, pre_only=True, **kw)

    def __call__(self, x, c, inp: BlockInputs, bm: BlockMerge):
        (m_a, u_a), (m_m, u_m) = bm.attn, bm.mlp
        shift, scale, gate = self.norm(inp.temb)
        nx = modulate(self.norm.norm, x, shift, scale)
        nc = modulate(self.norm.norm, c, shift, scale)
        hq = m_a(nx)
        hk = bm.kv_down(nx) if bm.kv_down is not None else hq
        rope_q, rope_k = merged_ropes(inp, m_a, bm.kv_down)
        out = joint_attention(self.attn.qkv(nc, nc), self.attn.qkv(hq, hk), rope_q, rope_k,
                              inp.attention)
        t = c.shape[1]
        mlp = lambda h: jax.nn.gelu(self.proj_mlp(h), approximate=True)  # noqa: E731
        c_out = self.proj_out(jnp.concatenate([out[:, :t], mlp(nc)], axis=-1))
        if u_a is u_m:  # one plan on both branches: project merged tokens, then unmerge
            x_out = u_a(self.proj_out(jnp.concatenate([out[:, t:], mlp(m_m(nx))], axis=-1)))
        else:
            x_out = self.proj_out(jnp.concatenate([u_a(out[:, t:]), u_m(mlp(m_m(nx)))], -1))
        return x + gate[:, None] * x_out, c + gate[:, None] * c_out


class TextProjection(nnx.Module):
    """``PixArtAlphaTextProjection`` with SiLU: the pooled text embedding's MLP."""

    def __init__(self, cin, dim, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = linear(cin, dim, **kw)
        self.linear_2 = linear(dim, dim, **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
    """``CombinedTimestep[Guidance]TextProjEmbeddings``: timestep (and guidance)
    sinusoids through MLPs plus the pooled text projection."""

    def __init__(self, dim, pooled_dim, guidance, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.timestep_embedder = TimestepEmbedding(256, dim, **kw)
        self.guidance_embedder = TimestepEmbedding(256, dim, **kw) if guidance else None
        self.text_embedder = TextProjection(pooled_dim, dim, **kw)
        self.dtype = dtype

    def __call__(self, timestep, guidance, pooled):
        sinusoid = lambda t: timestep_embedding(t, 256, True, 0.0).astype(self.dtype)  # noqa
        emb = self.timestep_embedder(sinusoid(timestep))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(sinusoid(guidance))
        return emb + self.text_embedder(pooled)


class FluxTransformer2DModel(nnx.Module):
    """The NNX module. Use `FluxTransformer` (from `load_flux_transformer`) to call it."""

    def __init__(self, cfg: FluxConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.config = cfg
        self.time_text_embed = TimeTextEmbed(d, cfg.pooled_projection_dim, cfg.guidance_embeds,
                                             **kw)
        self.context_embedder = linear(cfg.joint_attention_dim, d, **kw)
        self.x_embedder = linear(cfg.in_channels, d, **kw)
        self.transformer_blocks = nnx.List([FluxTransformerBlock(d, heads, hd, **kw)
                                            for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nnx.List([
            FluxSingleTransformerBlock(d, heads, hd, **kw) for _ in range(cfg.num_single_layers)])
        self.norm_out = AdaNorm(d, d, 2, **kw)
        self.proj_out = linear(d, cfg.out_dim, **kw)
        self.dtype = dtype

    def __call__(self, hidden_states, encoder_hidden_states, pooled, timestep, img_ids,
                 txt_ids, guidance=None, ctx: MergeContext | None = None, attention="auto",
                 grid=None, constrain=None):
        """``constrain``: ``x -> x`` applied to both token streams between blocks (the
        batch split of a mesh: `sharding.token_constraint`), or None."""
        cfg = self.config
        constrain = constrain or (lambda a: a)
        b = hidden_states.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,)) * 1000
        g = None
        if cfg.guidance_embeds:
            g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32).reshape(-1), (b,)) * 1000
        temb = self.time_text_embed(t, g, pooled.astype(self.dtype))
        x = self.x_embedder(hidden_states.astype(self.dtype))
        c = self.context_embedder(encoder_hidden_states.astype(self.dtype))
        x, c = constrain(x), constrain(c)
        image_ids = jnp.broadcast_to(img_ids.astype(jnp.float32), (b, *img_ids.shape[-2:]))
        inp = BlockInputs(temb, rope(txt_ids, cfg.axes_dims_rope), rope(img_ids, cfg.axes_dims_rope),
                          image_ids, cfg.axes_dims_rope, attention)
        for block in (*self.transformer_blocks, *self.single_transformer_blocks):
            bm = ctx.block(block, x, grid) if ctx is not None else BlockMerge()
            x, c = block(x, c, inp, bm)
            x, c = constrain(x), constrain(c)
        shift_scale = self.norm_out(temb)
        scale, shift = shift_scale  # AdaLayerNormContinuous: scale first
        return self.proj_out(modulate(self.norm_out.norm, x, shift, scale))


# --------------------------------------------------------------------------- public wrapper


class FluxOutput(NamedTuple):
    """``sample`` ``[B, N, out_channels]`` (packed, like the input) and ``merge_state``
    (for ``ReToM(cache_step=...)``, else None)."""
    sample: jax.Array
    merge_state: Any = None


def image_ids(h: int, w: int) -> np.ndarray:
    """``[h * w, 3]`` ids of an ``h x w`` packed-latent grid: ``(0, row, col)``."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def grid_of(num_tokens: int, grid=None) -> tuple[int, int]:
    if grid is not None:
        h, w = (int(v) for v in grid)
        if h * w != num_tokens:
            raise ValueError(f"grid {h}x{w} has {h * w} cells, hidden_states has "
                             f"{num_tokens} tokens")
        return h, w
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} image tokens are not a square grid: pass "
                         f"grid=(rows, cols)")
    return side, side


class FluxTransformer(weights.LoadedModel):
    """A loaded Flux transformer: ``model(hidden_states, encoder_hidden_states,
    pooled_projections, timestep, img_ids, txt_ids, guidance=None)`` -> `FluxOutput`.

    Shapes: hidden_states ``[B, N, in_channels]`` (``N = h * w`` packed latent cells),
    encoder_hidden_states ``[B, T, joint_attention_dim]``, pooled ``[B, pooled_dim]``,
    timestep ``[B]`` or a scalar in [0, 1] (diffusers' convention, times 1000 inside),
    img_ids ``[N, 3]``, txt_ids ``[T, 3]``, guidance ``[B]`` (dev only). ``grid`` (static)
    is the image's ``(h, w)`` for merging (default: square). ``apply(params, ...)`` is the
    pure function underneath.
    """

    def __init__(self, config, graphdef, params, *, dtype, param_dtype=None, mesh=None,
                 attention="auto"):
        super().__init__(config, graphdef, params, dtype=dtype, param_dtype=param_dtype,
                         mesh=mesh)
        self.attention = check_implementation(attention)
        self._jitted = jax.jit(self.apply, static_argnames=("merge", "attention", "reuse",
                                                             "grid"))

    def check_inputs(self, hidden_states, encoder_hidden_states, pooled, timestep, img_ids,
                     txt_ids, guidance=None, merge=None, merge_state=None, key=None,
                     grid=None):
        cfg = self.config
        shape = lambda a: tuple(getattr(a, "shape", ()))  # noqa: E731
        if len(shape(hidden_states)) != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(f"hidden_states must be [batch, tokens, {cfg.in_channels}] "
                             f"(the packed latent), got shape {shape(hidden_states)}")
        b, n, _ = hidden_states.shape
        if shape(encoder_hidden_states)[::2] != (b, cfg.joint_attention_dim) or len(
                shape(encoder_hidden_states)) != 3:
            raise ValueError(f"encoder_hidden_states must be [{b}, tokens, "
                             f"{cfg.joint_attention_dim}], got {shape(encoder_hidden_states)}")
        if shape(pooled) != (b, cfg.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be [{b}, {cfg.pooled_projection_dim}], "
                             f"got {shape(pooled)}")
        if shape(img_ids) != (n, 3) or shape(txt_ids) != (encoder_hidden_states.shape[1], 3):
            raise ValueError(f"img_ids must be [{n}, 3] and txt_ids "
                             f"[{encoder_hidden_states.shape[1]}, 3], got {shape(img_ids)} "
                             f"and {shape(txt_ids)}")
        if shape(timestep) not in ((), (1,), (b,)):
            raise ValueError(f"timestep must be a scalar or [{b}], got {shape(timestep)}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this is a guidance-distilled Flux (dev): pass guidance=[batch] "
                             "(e.g. 3.5)")
        if merge is not None:
            self.check_merge(merge, grid_of(n, grid), key=key, merge_state=merge_state)
            merge.check_state(merge_state)

    def check_merge(self, merge, grid, key=None, merge_state=None):
        if not isinstance(merge, MergeMethod):
            raise ValueError(f"merge must be ToMe, ReToM or ToDo (or None; any "
                             f"retom_jax.merge.MergeMethod), got {merge!r}")
        merge.check({1: tuple(grid)}, key)
        if merge_state is not None:
            merge.check_state(merge_state)

    def init_merge_state(self, hidden_shape, text_shape, merge, grid=None):
        """Zero state for ``ReToM(cache_step=...)`` (see ``UNet.init_merge_state``)."""
        if merge is None or not merge.carries_cache:
            raise ValueError("init_merge_state needs ReToM(cache_step=...): nothing else carries state")
        b, n, _ = hidden_shape
        spec = jax.ShapeDtypeStruct
        cfg = self.config
        out = jax.eval_shape(
            lambda p, x, e: self._forward(
                p, x, e, jnp.zeros((b, cfg.pooled_projection_dim)), jnp.zeros(()),
                jnp.zeros((n, 3)), jnp.zeros((text_shape[1], 3)), jnp.zeros((b,)),
                merge=merge, grid=grid_of(n, grid)),
            self.params, spec(hidden_shape, self.dtype), spec(text_shape, self.dtype))
        return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), out.merge_state)

    def apply(self, params, hidden_states, encoder_hidden_states, pooled, timestep, img_ids,
              txt_ids, guidance=None, *, merge=None, merge_state=None, key=None,
              attention=None, reuse=None, grid=None) -> FluxOutput:
        if merge is not None:
            merge.check_state(merge_state)
        return self._forward(params, hidden_states, encoder_hidden_states, pooled, timestep,
                             img_ids, txt_ids, guidance, merge=merge, merge_state=merge_state,
                             key=key, attention=attention, reuse=reuse,
                             grid=grid_of(hidden_states.shape[1], grid))

    def _forward(self, params, hidden_states, encoder_hidden_states, pooled, timestep,
                 img_ids, txt_ids, guidance=None, *, merge=None, merge_state=None, key=None,
                 attention=None, reuse=None, grid=None):
        model = nnx.merge(self.graphdef, params)
        ctx = None
        if merge is not None:
            paths = {id(m): ".".join(map(str, p)) for p, m in nnx.iter_modules(model)
                     if isinstance(m, (FluxTransformerBlock, FluxSingleTransformerBlock))}
            ctx = MergeContext(merge, grid, paths, key=key, state=merge_state, reuse=reuse)
        with attention_target(self.mesh):  # kernels for the mesh's platform, per shard
            out = model(hidden_states, encoder_hidden_states, pooled, timestep, img_ids,
                        txt_ids, guidance, ctx, attention or self.attention, grid,
                        sharding.token_constraint(self.mesh))
        carried = merge is not None and merge.carries_cache
        return FluxOutput(out, ctx.new_state() if carried else None)

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                 img_ids, txt_ids, guidance=None, *, merge=None, merge_state=None, key=None,
                 attention=None, reuse=None, grid=None) -> FluxOutput:
        self.check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                          img_ids, txt_ids, guidance, merge=merge, merge_state=merge_state,
                          key=key, grid=grid)
        if attention is not None:
            check_implementation(attention)
        grid = grid_of(hidden_states.shape[1], grid)
        return self._jitted(self.params, hidden_states, encoder_hidden_states,
                            pooled_projections, timestep, img_ids, txt_ids, guidance,
                            merge=merge, merge_state=merge_state, key=key, attention=attention,
                            reuse=reuse, grid=grid)


def _build(config, dtype, param_dtype):
    return lambda rngs: FluxTransformer2DModel(config, dtype=dtype, param_dtype=param_dtype,
                                               rngs=rngs)


def load_flux_transformer(path_or_repo_id, dtype=jnp.float32, param_dtype=None, *,
                          subfolder="transformer", variant=None, attention="auto",
                          mesh=None) -> FluxTransformer:
    """Load a diffusers ``FluxTransformer2DModel`` folder (or a pipeline folder's
    ``transformer/``, or a repo id in the local Hugging Face cache), without torch.
    Arguments as `load_unet` (``mesh``: parameters placed by ``sharding`` rules, each
    device reading its shard)."""
    dtype, param_dtype = weights.dtypes(dtype, param_dtype)
    check_implementation(attention)
    folder, config = weights.read_model_config(path_or_repo_id, subfolder, FluxConfig)
    graphdef, params = weights.load_module(folder, _build(config, dtype, param_dtype),
                                           param_dtype, stem="diffusion_pytorch_model",
                                           variant=variant, mesh=mesh)
    return FluxTransformer(config, graphdef, params, dtype=dtype, param_dtype=param_dtype,
                           mesh=mesh, attention=attention)


def init_flux_transformer(config: FluxConfig | dict, seed: int = 0, dtype=jnp.float32,
                          param_dtype=None, attention="auto") -> FluxTransformer:
    """Random weights (`weights.random_state`), same structure as a checkpoint's."""
    if isinstance(config, dict):
        config = FluxConfig.from_dict(config)
    dtype, param_dtype = weights.dtypes(dtype, param_dtype)
    graphdef, params = weights.random_params(_build(config, dtype, param_dtype), param_dtype,
                                             seed)
    return FluxTransformer(config, graphdef, params, dtype=dtype, param_dtype=param_dtype,
                           attention=attention)


def abstract_flux_transformer(config: FluxConfig | dict, dtype=jnp.bfloat16,
                              param_dtype=None, attention="auto", mesh=None) -> FluxTransformer:
    """Shapes only (``jax.ShapeDtypeStruct`` parameters): for lowering and cost analysis
    of full-size architectures without making their weights. ``mesh``: the shapes carry
    the shardings the rules give them there (``sharding.param_placement``), and attention
    is traced for the mesh's platform."""
    if isinstance(config, dict):
        config = FluxConfig.from_dict(config)
    dtype, param_dtype = weights.dtypes(dtype, param_dtype)
    graphdef, params = nnx.split(weights.abstract_module(_build(config, dtype, param_dtype)))
    params = sharding.abstract_params(params, mesh)
    return FluxTransformer(config, graphdef, params, dtype=dtype, param_dtype=param_dtype,
                           attention=attention, mesh=mesh)


# The real architectures (diffusers' transformer/config.json of black-forest-labs'
# FLUX.1-dev and FLUX.1-schnell; they differ only in the guidance embedding).
FLUX_DEV = dict(num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                in_channels=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_SCHNELL = dict(FLUX_DEV, guidance_embeds=False)
