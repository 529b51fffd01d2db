"""Stable Diffusion 3 / 3.5's ``SD3Transformer2DModel`` (MMDiT) in Flax NNX, with token
merging in every joint block.

Names follow diffusers (keys map through ``weights.RENAME``). The latent (NCHW, 16
channels) is cut into ``patch_size`` patches by a strided convolution and given a fixed
2-D sin-cos position embedding (a stored table, centre-cropped to the grid), so unlike
Flux no position is needed inside the blocks and merged tokens need none. Each
``JointTransformerBlock`` attends over ``image + text`` tokens (image first) with separate
weights per stream; SD3.5 adds RMS qk-norm (``qk_norm="rms_norm"``) and, in the
``dual_attention_layers``, a second image-only self-attention (``attn2``) with its own
adaLN modulation. The last block updates only the image stream (``context_pre_only``).

Merging (image tokens only): the block's plan comes from its input image tokens; the
normalised image tokens are merged before the joint attention (and before ``attn2`` and,
with ``merge_mlp``, the MLP) and unmerged before each gated residual add. ToDo pools the
image keys/values of both attentions.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from . import weights
from .. import sharding
from .attention import check_implementation, dot_product_attention
from .attention import target as attention_target
from .layers import Identity, conv, linear
from ..merge import BlockMerge, MergeMethod
from .unet import MergeContext
from .flux import AdaNorm, FeedForward, TimeTextEmbed, modulate, plain_norm, rms_norm


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """The fields of a diffusers ``SD3Transformer2DModel`` config (diffusers' defaults)."""
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple = ()
    qk_norm: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {self.qk_norm!r} is not supported (None or 'rms_norm')")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim ({self.caption_projection_dim}) must equal "
                             f"num_attention_heads * attention_head_dim ({self.inner_dim})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "SD3 config") -> "SD3Config":
        with weights.config_errors(where):
            name = cfg.get("_class_name", "SD3Transformer2DModel")
            if name != "SD3Transformer2DModel":
                raise ValueError(f"this config describes a {name}, not an SD3Transformer2DModel")
            return cls(**weights.config_fields(cls, cfg))


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: SD3Config, *, dtype, param_dtype, rngs):
        self.proj = conv(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size,
                         padding=0, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        m = cfg.pos_embed_max_size
        self.pos_embed = nnx.Param(jnp.zeros((1, m * m, cfg.inner_dim), param_dtype))
        self.max_size = m

    def __call__(self, x):  # NHWC latent -> [B, h * w, D], (h, w)
        x = self.proj(x)
        b, h, w, d = x.shape
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"a {h}x{w} patch grid exceeds pos_embed_max_size={self.max_size}")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed[...].reshape(self.max_size, self.max_size, d)
        pos = table[top:top + h, left:left + w].reshape(1, h * w, d)
        return x.reshape(b, h * w, d) + pos.astype(x.dtype), (h, w)


class SD3Attention(nnx.Module):
    """diffusers' ``Attention`` with ``JointAttnProcessor2_0``: image projections
    (``to_q``...), with ``added`` the text's (``add_*_proj``, ``to_add_out`` unless
    ``context_pre_only``), optional RMS qk-norm on every stream."""

    def __init__(self, dim, heads, head_dim, qk_norm, added, context_pre_only=False, *,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * head_dim
        norm = (lambda: rms_norm(head_dim, 1e-6, **kw)) if qk_norm else (lambda: None)
        self.norm_q, self.norm_k = norm(), norm()
        self.to_q, self.to_k, self.to_v = (linear(dim, inner, **kw) for _ in range(3))
        self.to_out = nnx.List([linear(inner, dim, **kw), Identity()])
        if added:
            self.norm_added_q, self.norm_added_k = norm(), norm()
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                linear(dim, inner, **kw) for _ in range(3))
            self.to_add_out = None if context_pre_only else linear(inner, dim, **kw)
        self.heads, self.head_dim = heads, head_dim

    def _proj(self, p, norm, x):
        y = p(x).reshape(*x.shape[:2], self.heads, self.head_dim)
        return y if norm is None else norm(y)

    def __call__(self, hq, hk, text, attention):
        """Image queries ``hq`` (keys/values from ``hk``), and ``text`` (None: image-only
        self-attention). Returns ``(image_out [B, M, D], text_out or None)``."""
        q = self._proj(self.to_q, self.norm_q, hq)
        k = self._proj(self.to_k, self.norm_k, hk)
        v = self._proj(self.to_v, None, hk)
        m = q.shape[1]
        if text is not None:
            q = jnp.concatenate([q, self._proj(self.add_q_proj, self.norm_added_q, text)], 1)
            k = jnp.concatenate([k, self._proj(self.add_k_proj, self.norm_added_k, text)], 1)
            v = jnp.concatenate([v, self._proj(self.add_v_proj, None, text)], 1)
        out = dot_product_attention(q, k, v, implementation=attention)
        out = out.reshape(*out.shape[:2], -1)
        img = self.to_out[0](out[:, :m])
        if text is None or self.to_add_out is None:
            return img, None
        return img, self.to_add_out(out[:, m:])


class JointTransformerBlock(nnx.Module):
    def __init__(self, cfg: SD3Config, last: bool, dual: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, heads, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.norm1 = AdaNorm(d, d, 9 if dual else 6, **kw)
        self.norm1_context = AdaNorm(d, d, 2 if last else 6, **kw)
        self.attn = SD3Attention(d, heads, hd, cfg.qk_norm, True, last, **kw)
        self.attn2 = SD3Attention(d, heads, hd, cfg.qk_norm, False, **kw) if dual else None
        self.norm2 = plain_norm(d, **kw)
        self.ff = FeedForward(d, **kw)
        self.norm2_context = None if last else plain_norm(d, **kw)
        self.ff_context = None if last else FeedForward(d, **kw)
        self.last = last

    def __call__(self, x, c, temb, bm: BlockMerge, attention):
        (m_a, u_a), (m_m, u_m) = bm.attn, bm.mlp
        mods = self.norm1(temb)
        shift, scale, gate, shift2, scale2, gate2 = mods[:6]
        if self.last:
            c_scale, c_shift = self.norm1_context(temb)  # AdaLayerNormContinuous: scale first
        else:
            c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        nc = modulate(self.norm1_context.norm, c, c_shift, c_scale)
        nx = modulate(self.norm1.norm, x, shift, scale)
        if self.attn2 is not None:  # both modulations read the block's input
            shift3, scale3, gate3 = mods[6:]
            nx2 = modulate(self.norm1.norm, x, shift3, scale3)
        hq = m_a(nx)
        hk = bm.kv_down(nx) if bm.kv_down is not None else hq
        img, txt = self.attn(hq, hk, nc, attention)
        x = x + gate[:, None] * u_a(img)
        if self.attn2 is not None:
            hq2 = m_a(nx2)
            hk2 = bm.kv_down(nx2) if bm.kv_down is not None else hq2
            x = x + gate3[:, None] * u_a(self.attn2(hq2, hk2, None, attention)[0])
        x = x + gate2[:, None] * u_m(self.ff(m_m(modulate(self.norm2, x, shift2, scale2))))
        if self.last:
            return x, c
        c = c + c_gate[:, None] * txt
        c = c + c_gate2[:, None] * self.ff_context(modulate(self.norm2_context, c, c_shift2,
                                                            c_scale2))
        return x, c


class SD3Transformer2DModel(nnx.Module):
    def __init__(self, cfg: SD3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.inner_dim
        self.config = cfg
        self.pos_embed = PatchEmbed(cfg, **kw)
        self.time_text_embed = TimeTextEmbed(d, cfg.pooled_projection_dim, False, **kw)
        self.context_embedder = linear(cfg.joint_attention_dim, cfg.caption_projection_dim, **kw)
        self.transformer_blocks = nnx.List([
            JointTransformerBlock(cfg, i == cfg.num_layers - 1, i in cfg.dual_attention_layers,
                                  **kw) for i in range(cfg.num_layers)])
        self.norm_out = AdaNorm(d, d, 2, **kw)
        self.proj_out = linear(d, cfg.patch_size ** 2 * cfg.out_channels, **kw)
        self.dtype = dtype

    def __call__(self, sample, encoder_hidden_states, pooled, timestep, ctx=None,
                 attention="auto", constrain=None):
        """``constrain``: as `FluxTransformer2DModel`'s (between blocks), or None."""
        cfg, p = self.config, self.config.patch_size
        constrain = constrain or (lambda a: a)
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        x, (h, w) = self.pos_embed(jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype))
        temb = self.time_text_embed(t, None, pooled.astype(self.dtype))
        c = self.context_embedder(encoder_hidden_states.astype(self.dtype))
        x, c = constrain(x), constrain(c)
        for block in self.transformer_blocks:
            bm = ctx.block(block, x, (h, w)) if ctx is not None else BlockMerge()
            x, c = block(x, c, temb, bm, attention)
            x, c = constrain(x), constrain(c)
        scale, shift = self.norm_out(temb)
        x = self.proj_out(modulate(self.norm_out.norm, x, shift, scale))
        x = x.reshape(b, h, w, p, p, cfg.out_channels)
        return jnp.einsum("nhwpqc->nchpwq", x).reshape(b, cfg.out_channels, h * p, w * p)


class SD3Output(NamedTuple):
    sample: jax.Array  # NCHW, like the input
    merge_state: object = None


class SD3Transformer(weights.LoadedModel):
    """A loaded SD3 transformer: ``model(sample [B, 16, H, W], encoder_hidden_states
    [B, T, joint_dim], pooled [B, pooled_dim], timestep [B] in [0, 1000])`` ->
    `SD3Output`. ``apply(params, ...)`` is the pure function."""

    def __init__(self, config, graphdef, params, *, dtype, param_dtype=None, mesh=None,
                 attention="auto"):
        super().__init__(config, graphdef, params, dtype=dtype, param_dtype=param_dtype,
                         mesh=mesh)
        self.attention = check_implementation(attention)
        self._jitted = jax.jit(self.apply, static_argnames=("merge", "attention", "reuse"))

    def grid(self, sample_shape) -> tuple[int, int]:
        p = self.config.patch_size
        return sample_shape[2] // p, sample_shape[3] // p

    def check_merge(self, merge, grid, key=None, merge_state=None):
        if not isinstance(merge, MergeMethod):
            raise ValueError(f"merge must be ToMe, ReToM or ToDo (or None), got {merge!r}")
        merge.check({1: tuple(grid)}, key)
        if merge_state is not None:
            merge.check_state(merge_state)

    def init_merge_state(self, sample_shape, text_shape, merge):
        """Zero state for ``ReToM(cache_step=...)`` (see ``UNet.init_merge_state``)."""
        if merge is None or not merge.carries_cache:
            raise ValueError("init_merge_state needs ReToM(cache_step=...): nothing else carries state")
        spec = lambda s: jax.ShapeDtypeStruct(s, self.dtype)  # noqa: E731
        b = sample_shape[0]
        out = jax.eval_shape(
            lambda p, x, e: self.apply(p, x, e, jnp.zeros((b, self.config.pooled_projection_dim),
                                                          self.dtype), jnp.zeros((b,)),
                                       merge=merge),
            self.params, spec(sample_shape), spec(text_shape))
        return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), out.merge_state)

    def apply(self, params, sample, encoder_hidden_states, pooled, timestep, *, merge=None,
              merge_state=None, key=None, attention=None, reuse=None) -> SD3Output:
        model = nnx.merge(self.graphdef, params)
        ctx = None
        if merge is not None:
            paths = {id(m): ".".join(map(str, path)) for path, m in nnx.iter_modules(model)
                     if isinstance(m, JointTransformerBlock)}
            ctx = MergeContext(merge, self.grid(sample.shape), paths, key=key,
                               state=merge_state, reuse=reuse)
        with attention_target(self.mesh):  # kernels for the mesh's platform, per shard
            out = model(sample, encoder_hidden_states, pooled, timestep, ctx,
                        attention or self.attention, sharding.token_constraint(self.mesh))
        carried = merge is not None and merge.carries_cache
        return SD3Output(out, ctx.new_state() if carried else None)

    def __call__(self, sample, encoder_hidden_states, pooled_projections, timestep, *,
                 merge=None, merge_state=None, key=None, attention=None, reuse=None):
        c = self.config
        if getattr(sample, "ndim", 0) != 4 or sample.shape[1] != c.in_channels or any(
                s % c.patch_size for s in sample.shape[2:]):
            raise ValueError(f"sample must be NCHW [batch, {c.in_channels}, H, W] with H, W "
                             f"multiples of {c.patch_size}, got {getattr(sample, 'shape', None)}")
        if merge is not None:
            self.check_merge(merge, self.grid(sample.shape), key, merge_state)
            merge.check_state(merge_state)
        return self._jitted(self.params, sample, encoder_hidden_states, pooled_projections,
                            timestep, merge=merge, merge_state=merge_state, key=key,
                            attention=attention, reuse=reuse)


def _build(config, dtype, param_dtype):
    return lambda rngs: SD3Transformer2DModel(config, dtype=dtype, param_dtype=param_dtype,
                                              rngs=rngs)


def load_sd3_transformer(path_or_repo_id, dtype=jnp.float32, param_dtype=None, *,
                         subfolder="transformer", variant=None, attention="auto",
                         mesh=None) -> SD3Transformer:
    """Load a diffusers ``SD3Transformer2DModel`` folder without torch (as `load_unet`)."""
    dtype, param_dtype = weights.dtypes(dtype, param_dtype)
    check_implementation(attention)
    folder, config = weights.read_model_config(path_or_repo_id, subfolder, SD3Config)
    graphdef, params = weights.load_module(folder, _build(config, dtype, param_dtype),
                                           param_dtype, stem="diffusion_pytorch_model",
                                           variant=variant, mesh=mesh)
    return SD3Transformer(config, graphdef, params, dtype=dtype, param_dtype=param_dtype,
                          mesh=mesh, attention=attention)


def abstract_sd3_transformer(config: SD3Config | dict, dtype=jnp.bfloat16,
                             attention="auto", mesh=None) -> SD3Transformer:
    """Shapes only, for lowering and cost analysis of full-size architectures (``mesh``:
    placed there by the sharding rules, as `abstract_flux_transformer`)."""
    if isinstance(config, dict):
        config = SD3Config.from_dict(config)
    dtype, param_dtype = weights.dtypes(dtype)
    graphdef, params = nnx.split(weights.abstract_module(_build(config, dtype, param_dtype)))
    params = sharding.abstract_params(params, mesh)
    return SD3Transformer(config, graphdef, params, dtype=dtype, param_dtype=param_dtype,
                          attention=attention, mesh=mesh)


# The real architecture (diffusers' transformer/config.json of stabilityai's
# stable-diffusion-3.5-medium).
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
