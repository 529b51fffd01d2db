"""The T5 encoder (transformers' ``T5EncoderModel``) in Flax NNX: Flux's and SD3's second
text encoder (T5 v1.1 XXL: gated-GELU feed-forward, no biases, RMS layer norms).

Attention is unscaled (T5 folds the ``1/sqrt(d)`` into its weights) and every layer adds
the same learned relative-position bias, kept in the first block
(``relative_attention_bias``, one value per head and distance bucket: exact buckets for
small distances, logarithmic ones up to ``relative_attention_max_distance``, separate
buckets for keys before and after the query). Module names follow transformers, so the
checkpoint's keys map through ``weights.RENAME``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import weights
from .layers import linear

FEED_FORWARDS = ("gated-gelu", "relu", "gated-relu", "gelu")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of a transformers ``T5Config`` that shape the encoder (defaults: t5-small;
    T5 v1.1 XXL has d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads, gated-gelu)."""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.feed_forward_proj not in FEED_FORWARDS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported; "
                             f"supported: {FEED_FORWARDS}")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated")

    @classmethod
    def from_dict(cls, raw: dict, where: str = "T5 config") -> "T5Config":
        with weights.config_errors(where):
            archs = raw.get("architectures") or ["T5EncoderModel"]
            if raw.get("model_type", "t5") not in ("t5", "umt5") or not any(
                    a.startswith(("T5", "UMT5")) for a in archs):
                raise ValueError(f"this config describes {archs}, not a T5 encoder")
            return cls(**weights.config_fields(cls, raw))


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """``int32 [q_len, k_len]``: the bidirectional bucket of every key offset
    ``key - query`` (as T5's ``_relative_position_bucket``)."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    exact = half // 2
    far = np.maximum(rel, exact).astype(np.float32)  # the log only matters from exact on
    large = exact + (np.log(far / np.float32(exact)) / np.float32(math.log(max_distance / exact))
                     * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(rel < exact, rel, large)).astype(np.int32)


def rms_norm(dim, eps, *, dtype, param_dtype, rngs):
    return nnx.RMSNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                       use_fast_variance=False, rngs=rngs)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, has_bias: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (linear(cfg.d_model, inner, False, **kw) for _ in range(3))
        self.o = linear(inner, cfg.d_model, False, **kw)
        self.relative_attention_bias = (
            nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs) if has_bias else None)
        self.cfg = cfg

    def position_bias(self, length: int):
        """``[1, heads, length, length]`` float32 bias of a ``length``-token sequence."""
        c = self.cfg
        idx = relative_position_buckets(length, length, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)
        values = self.relative_attention_bias.embedding[...][jnp.asarray(idx)]
        return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

    def __call__(self, x, bias):
        b, t, _ = x.shape
        heads = lambda y: y.reshape(b, t, self.cfg.num_heads, self.cfg.d_kv)  # noqa: E731
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
        weights_ = jax.nn.softmax(logits + bias, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights_, v.astype(jnp.float32)).astype(x.dtype)
        return self.o(out.reshape(b, t, -1))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg, has_bias, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.SelfAttention = T5Attention(cfg, has_bias, **kw)
        self.layer_norm = rms_norm(cfg.d_model, cfg.layer_norm_epsilon, **kw)

    def __call__(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseReluDense(nnx.Module):
    """``wi_0``/``wi_1``/``wo`` (gated) or ``wi``/``wo``; GELU is the tanh form
    (``gelu_new``)."""

    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.gated:
            self.wi_0 = linear(cfg.d_model, cfg.d_ff, False, **kw)
            self.wi_1 = linear(cfg.d_model, cfg.d_ff, False, **kw)
        else:
            self.wi = linear(cfg.d_model, cfg.d_ff, False, **kw)
        self.wo = linear(cfg.d_ff, cfg.d_model, False, **kw)
        self.gelu = "gelu" in cfg.feed_forward_proj
        self.gated = cfg.gated

    def _act(self, x):
        return jax.nn.gelu(x, approximate=True) if self.gelu else jax.nn.relu(x)

    def __call__(self, x):
        if self.gated:
            return self.wo(self._act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self._act(self.wi(x)))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.DenseReluDense = T5DenseReluDense(cfg, **kw)
        self.layer_norm = rms_norm(cfg.d_model, cfg.layer_norm_epsilon, **kw)

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    def __init__(self, cfg, has_bias, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer = nnx.List([T5LayerSelfAttention(cfg, has_bias, **kw), T5LayerFF(cfg, **kw)])

    def __call__(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nnx.Module):
    def __init__(self, cfg, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.block = nnx.List([T5Block(cfg, i == 0, **kw) for i in range(cfg.num_layers)])
        self.final_layer_norm = rms_norm(cfg.d_model, cfg.layer_norm_epsilon, **kw)

    def __call__(self, x, mask=None):
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        if mask is not None:  # [B, T] 1 = attend; masked keys get the float32 minimum
            bias = bias + jnp.where(mask[:, None, None, :] > 0, 0.0,
                                    jnp.finfo(jnp.float32).min)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.encoder = T5Stack(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None):
        return self.encoder(self.shared(input_ids), attention_mask)


class T5Encoder(weights.LoadedModel):
    """A loaded T5 encoder: ``encoder(input_ids [B, T] int, attention_mask=None)`` ->
    ``last_hidden_state [B, T, d_model]``. ``apply(params, ...)`` is the pure function."""

    def __init__(self, config, graphdef, params, *, dtype, param_dtype=None, mesh=None):
        super().__init__(config, graphdef, params, dtype=dtype, param_dtype=param_dtype,
                         mesh=mesh)
        self._jitted = jax.jit(self.apply)

    def apply(self, params, input_ids, attention_mask=None):
        return nnx.merge(self.graphdef, params)(jnp.asarray(input_ids), attention_mask)

    def __call__(self, input_ids, attention_mask=None):
        ids = np.asarray(input_ids) if not isinstance(input_ids, jax.core.Tracer) else input_ids
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer token ids [batch, tokens], got "
                             f"{ids.dtype}{list(ids.shape)}")
        if isinstance(ids, np.ndarray) and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (the "
                             f"vocabulary size); got values from {ids.min()} to {ids.max()}")
        return self._jitted(self.params, ids.astype(np.int32) if isinstance(ids, np.ndarray)
                            else ids, attention_mask)


def _convert(state: dict) -> dict:
    """The shared embedding under one name: transformers ties ``encoder.embed_tokens``
    to ``shared`` and saves either."""
    state = dict(state)
    tied = state.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in state and tied is not None:
        state["shared.weight"] = tied
    return state


def _build(config, dtype, param_dtype):
    return lambda rngs: T5EncoderModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def load_t5_encoder(path_or_repo_id, dtype=jnp.float32, param_dtype=None, *,
                    subfolder="text_encoder_2", variant=None, mesh=None) -> T5Encoder:
    """Load a transformers ``T5EncoderModel`` folder (or a pipeline folder's
    ``text_encoder_2/``, or a cached repo id), without torch."""
    dtype, param_dtype = weights.dtypes(dtype, param_dtype)
    folder, config = weights.read_model_config(path_or_repo_id, subfolder, T5Config)
    graphdef, params = weights.load_module(folder, _build(config, dtype, param_dtype),
                                           param_dtype, stem="model", variant=variant,
                                           mesh=mesh, convert=_convert)
    return T5Encoder(config, graphdef, params, dtype=dtype, param_dtype=param_dtype, mesh=mesh)


def init_t5_encoder(config: T5Config | dict, seed=0, dtype=jnp.float32,
                    param_dtype=None) -> T5Encoder:
    """Random weights (`weights.random_state`)."""
    if isinstance(config, dict):
        config = T5Config.from_dict(config)
    dtype, param_dtype = weights.dtypes(dtype, param_dtype)
    graphdef, params = weights.random_params(_build(config, dtype, param_dtype), param_dtype,
                                             seed)
    return T5Encoder(config, graphdef, params, dtype=dtype, param_dtype=param_dtype)


def load_t5_tokenizer(path, subfolder: str | None = "tokenizer_2"):
    """transformers' T5 tokenizer (fast) from a tokenizer folder, a pipeline folder
    (``subfolder``) or a cached repo id; local files only."""
    from pathlib import Path

    from .clip import quiet_transformers

    local = Path(str(path)).expanduser()
    folder = local / subfolder if subfolder and (local / subfolder).is_dir() else local
    if not folder.is_dir():
        folder = weights.cached_snapshot(path) / (subfolder or "")
    try:
        return quiet_transformers().AutoTokenizer.from_pretrained(str(folder),
                                                                  local_files_only=True)
    except Exception as e:
        raise weights.CheckpointError(f"could not read the T5 tokenizer in {folder}: {e}") from e
