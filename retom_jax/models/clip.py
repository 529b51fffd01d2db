"""CLIP text encoders (transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``)
and the CLIP tokenizer, as Stable Diffusion pipelines use them.

Stable Diffusion 1.x/2.x condition on ``last_hidden_state`` of one ``CLIPTextModel``;
SDXL concatenates ``hidden_states[-2]`` of a ``CLIPTextModel`` and of a
``CLIPTextModelWithProjection`` and also uses the second one's ``text_embeds``.

The modules are named as transformers names them (``text_model.encoder.layers.3.mlp.fc1``
...), so :func:`retom_jax.weights.load_params` maps checkpoint keys without special cases.
Two layouts of checkpoint keys exist for the plain model: older transformers save
``text_model.embeddings...``, transformers 5 saves ``embeddings...``; both are read.

Typical use::

    tokenizer = load_tokenizer("path/to/sd-pipeline")          # subfolder "tokenizer"
    encoder = load_text_encoder("path/to/sd-pipeline")         # subfolder "text_encoder"
    out = encoder(tokenize(tokenizer, ["a photo of a cat"]))
    out.last_hidden_state   # [1, 77, 768]
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import check_implementation, dot_product_attention
from .layers import layer_norm, linear
from .weights import CheckpointError, LoadedModel, cached_snapshot, config_errors, config_fields, dtypes, load_module, read_model_config

__all__ = [
    "TextEncoderConfig", "TextEncoderOutput", "TextEncoder", "CLIPTextModel",
    "CLIPTextModelWithProjection", "load_text_encoder", "load_tokenizer", "tokenize",
]


def quick_gelu(x):
    """``x * sigmoid(1.702 x)``: the GELU approximation of the original CLIP."""
    return x * jax.nn.sigmoid(1.702 * x)


# ``hidden_act`` values of config.json -> activation.
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")

# transformers' CLIPTextConfig default for the projection head's width (the dataclass
# default is None: a plain CLIPTextModel has no projection).
_PROJECTION_DIM = 512


# ----------------------------------------------------------------------------- config

def check_encoder_fields(config, more_ints: tuple = ()) -> None:
    """``ValueError`` unless the transformer-stack fields of a CLIP text or image config
    are usable: positive integer sizes (and ``more_ints``), a width the heads divide, a
    known activation, a positive ``layer_norm_eps``."""
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads") + tuple(more_ints):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value > (1 << 20) or (name == "num_hidden_layers" and value > 1024):
            raise ValueError(f"{name} {value} is larger than any CLIP model retom-jax builds")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by "
                         f"num_attention_heads {config.num_attention_heads}")
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; supported: "
                         f"{', '.join(ACTIVATIONS)}")
    if not (isinstance(config.layer_norm_eps, (int, float)) and config.layer_norm_eps > 0):
        raise ValueError(f"layer_norm_eps must be a positive number, "
                         f"got {config.layer_norm_eps!r}")


@dataclass(frozen=True)
class TextEncoderConfig:
    """The fields of a transformers ``CLIPTextConfig`` that the forward pass needs, with
    transformers' defaults.

    ``projection_dim`` is ``None`` for the plain ``CLIPTextModel`` (no ``text_embeds``).
    ``eos_token_id == 2`` selects the legacy pooling of old checkpoints (the position of
    the largest token id); any other value pools at the first occurrence of that id.
    """

    architecture: str = "CLIPTextModel"
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    eos_token_id: int = 49407
    bos_token_id: int | None = 49406
    pad_token_id: int | None = 1

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown CLIP text architecture {self.architecture!r}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        check_encoder_fields(self, ("vocab_size", "max_position_embeddings"))
        if self.with_projection:
            if not isinstance(self.projection_dim, int) or self.projection_dim < 1:
                raise ValueError(f"{self.architecture} needs a positive integer "
                                 f"projection_dim, got {self.projection_dim!r}")
        elif self.projection_dim is not None:
            raise ValueError("projection_dim must be None for CLIPTextModel (it has no "
                             "projection)")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(f"eos_token_id must be an integer (the pooled output is taken "
                             f"at the EOS token), got {self.eos_token_id!r}")

    @property
    def with_projection(self) -> bool:
        return self.architecture == "CLIPTextModelWithProjection"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> "TextEncoderConfig":
        """Read a transformers ``config.json`` dict; ``CheckpointError`` starting with
        ``where`` when it is not a supported CLIP text encoder."""
        with config_errors(where):
            values = config_fields(cls, raw)
            archs = raw.get("architectures")
            if not archs:
                raise ValueError(f"no 'architectures' entry; expected one of "
                                 f"{', '.join(ARCHITECTURES)}")
            archs = [archs] if isinstance(archs, str) else list(archs)
            known = [a for a in archs if a in ARCHITECTURES]
            if not known:
                raise ValueError(f"declares architecture(s) {archs}, which retom-jax's CLIP "
                                 f"text encoder does not implement; supported: "
                                 f"{', '.join(ARCHITECTURES)}")
            values["architecture"] = known[0]
            eos = values.get("eos_token_id", cls.eos_token_id)
            if isinstance(eos, (list, tuple)) and len(eos) == 1:
                eos = eos[0]
            if not isinstance(eos, int) or isinstance(eos, bool):
                raise ValueError(f"eos_token_id must be one integer (the pooled output is "
                                 f"taken at the EOS token), got {eos!r}")
            values["eos_token_id"] = eos
            if known[0] == "CLIPTextModelWithProjection":
                values.setdefault("projection_dim", _PROJECTION_DIM)
            else:
                values["projection_dim"] = None
            return cls(**values)


# ----------------------------------------------------------------------------- modules

class CLIPAttention(nnx.Module):
    """Multi-head self-attention (``q_proj``/``k_proj``/``v_proj``/``out_proj``); causal
    for the text encoder, bidirectional (``causal=False``) for the image tower. ``config``
    needs ``hidden_size``, ``num_attention_heads`` and ``head_dim``."""

    def __init__(self, config: TextEncoderConfig, *, attention="auto", dtype, param_dtype,
                 rngs, causal: bool = True):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c = config.hidden_size
        self.q_proj = linear(c, c, **kw)
        self.k_proj = linear(c, c, **kw)
        self.v_proj = linear(c, c, **kw)
        self.out_proj = linear(c, c, **kw)
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.attention = attention
        self.causal = causal

    def __call__(self, x):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.heads, self.head_dim)  # noqa: E731
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                    split(self.v_proj(x)), is_causal=self.causal,
                                    implementation=self.attention)
        return self.out_proj(out.reshape(b, t, self.heads * self.head_dim))


class CLIPMLP(nnx.Module):
    def __init__(self, config: TextEncoderConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(config.hidden_size, config.intermediate_size, **kw)
        self.fc2 = linear(config.intermediate_size, config.hidden_size, **kw)
        self.hidden_act = config.hidden_act

    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: TextEncoderConfig, *, attention="auto", dtype, param_dtype,
                 rngs, causal: bool = True):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.self_attn = CLIPAttention(config, attention=attention, causal=causal, **kw)
        self.layer_norm2 = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(config, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The layer stack; ``causal=False`` for the image tower (``retom_jax.eval``)."""

    def __init__(self, config: TextEncoderConfig, *, attention="auto", dtype, param_dtype,
                 rngs, causal: bool = True):
        self.layers = nnx.List([
            CLIPEncoderLayer(config, attention=attention, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs, causal=causal)
            for _ in range(config.num_hidden_layers)
        ])

    def __call__(self, x):
        """All hidden states: the input, then the output of every layer."""
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return tuple(states)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: TextEncoderConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = nnx.Embed(config.max_position_embeddings,
                                            config.hidden_size, **kw)

    def __call__(self, input_ids):
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextTransformer(nnx.Module):
    """Embeddings, causal encoder, final LayerNorm and EOS pooling."""

    def __init__(self, config: TextEncoderConfig, *, attention="auto", dtype, param_dtype,
                 rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, attention=attention, **kw)
        self.final_layer_norm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.eos_token_id = config.eos_token_id

    def __call__(self, input_ids):
        hidden_states = self.encoder(self.embeddings(input_ids))
        last = self.final_layer_norm(hidden_states[-1])
        ids = input_ids.astype(jnp.int32)
        if self.eos_token_id == 2:
            # Legacy configs (eos_token_id 2, as in SD 1.x) pool at the largest id, which
            # is the EOS of the CLIP vocabulary; argmax takes the first one on ties.
            eos_pos = jnp.argmax(ids, axis=-1)
        else:
            # First occurrence of the EOS id (the pad token may equal it).
            eos_pos = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return last, hidden_states, pooled


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TextEncoderOutput:
    """What a CLIP text encoder returns (a pytree).

    ``hidden_states`` has ``num_hidden_layers + 1`` entries: the embedding output and the
    output of each layer, before the final LayerNorm (SDXL uses ``hidden_states[-2]``).
    ``last_hidden_state`` is the last one after the final LayerNorm. ``pooler_output`` is
    ``last_hidden_state`` at the EOS token; ``text_embeds`` is its projection
    (``CLIPTextModelWithProjection`` only, else ``None``).
    """

    last_hidden_state: jax.Array
    hidden_states: tuple
    pooler_output: jax.Array
    text_embeds: jax.Array | None = None


class CLIPTextModel(nnx.Module):
    def __init__(self, config: TextEncoderConfig, *, attention="auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.text_model = CLIPTextTransformer(config, attention=attention, dtype=dtype,
                                              param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids) -> TextEncoderOutput:
        last, hidden_states, pooled = self.text_model(input_ids)
        return TextEncoderOutput(last, hidden_states, pooled, None)


class CLIPTextModelWithProjection(nnx.Module):
    def __init__(self, config: TextEncoderConfig, *, attention="auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.text_model = CLIPTextTransformer(config, attention=attention, dtype=dtype,
                                              param_dtype=param_dtype, rngs=rngs)
        self.text_projection = linear(config.hidden_size, config.projection_dim, bias=False,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids) -> TextEncoderOutput:
        last, hidden_states, pooled = self.text_model(input_ids)
        return TextEncoderOutput(last, hidden_states, pooled, self.text_projection(pooled))


MODEL_CLASSES = {"CLIPTextModel": CLIPTextModel,
                 "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


# ----------------------------------------------------------------------------- wrapper

def check_input_ids_shape(shape: tuple, dtype, config: TextEncoderConfig) -> None:
    """``ValueError`` unless the ids are a ``[batch, tokens]`` integer array that fits."""
    if len(shape) != 2:
        raise ValueError(f"input_ids must be a 2-D [batch, tokens] array, got shape "
                         f"{tuple(shape)}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"input_ids has an empty dimension: shape {tuple(shape)}")
    if shape[1] > config.max_position_embeddings:
        raise ValueError(f"input_ids has {shape[1]} tokens, more than this text encoder's "
                         f"max_position_embeddings ({config.max_position_embeddings}); "
                         f"tokenize with truncation to at most that length")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {dtype}")


class TextEncoder(LoadedModel):
    """A loaded CLIP text encoder (`weights.LoadedModel`: ``config``, ``graphdef``,
    ``params``, ``dtype``, ``param_dtype``, ``mesh``).

    ``apply(params, input_ids)`` is pure (use it inside ``jax.jit``); calling the object
    runs a jitted ``apply`` on its own ``params`` after checking the ids' values too.
    """

    def __init__(self, config: TextEncoderConfig, graphdef, params, *, dtype, param_dtype,
                 mesh=None):
        super().__init__(config, graphdef, params, dtype=dtype, param_dtype=param_dtype,
                         mesh=mesh)
        self._jitted = jax.jit(self.apply)

    def apply(self, params, input_ids) -> TextEncoderOutput:
        check_input_ids_shape(jnp.shape(input_ids), jnp.result_type(input_ids), self.config)
        return nnx.merge(self.graphdef, params)(jnp.asarray(input_ids))

    def apply_final_layer_norm(self, params, hidden):
        """The encoder's final LayerNorm on ``hidden`` (a ``hidden_states`` entry): what
        ``clip_skip`` conditions on in diffusers' Stable Diffusion pipeline."""
        return nnx.merge(self.graphdef, params).text_model.final_layer_norm(hidden)

    def __call__(self, input_ids) -> TextEncoderOutput:
        if not isinstance(input_ids, jax.core.Tracer):
            input_ids = np.asarray(input_ids)
            check_input_ids_shape(input_ids.shape, input_ids.dtype, self.config)
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (the "
                                 f"vocabulary size); got values from {lo} to {hi}")
            input_ids = input_ids.astype(np.int32)
        return self._jitted(self.params, input_ids)

    def __repr__(self):
        c = self.config
        return (f"TextEncoder({c.architecture}, layers={c.num_hidden_layers}, "
                f"hidden={c.hidden_size}, dtype={self.dtype.name}, "
                f"param_dtype={self.param_dtype.name})")


def _torch_layout_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop buffers and give every key the ``text_model.`` prefix our modules use."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):  # a non-parameter buffer in some versions
            continue
        if key.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm"):
            key = "text_model." + key  # transformers >= 5 saves CLIPTextModel unprefixed
        out[key] = value
    return out


def build_text_encoder(config: TextEncoderConfig, *, dtype=jnp.float32, param_dtype=None,
                       attention="auto", rngs: nnx.Rngs | None = None) -> nnx.Module:
    """A randomly initialised module for ``config`` (for tests and experiments)."""
    dtype, param_dtype = dtypes(dtype, param_dtype)
    check_implementation(attention)
    return MODEL_CLASSES[config.architecture](config, attention=attention, dtype=dtype,
                                              param_dtype=param_dtype,
                                              rngs=rngs or nnx.Rngs(0))


def load_text_encoder(path, dtype=jnp.float32, param_dtype=None,
                      subfolder: str = "text_encoder", *, variant: str | None = None,
                      attention: str = "auto", mesh=None) -> TextEncoder:
    """Load a transformers CLIP text encoder checkpoint.

    ``path``: a transformers model folder (``config.json`` + ``model.safetensors``,
    sharded or ``.fp16`` variant), a diffusers pipeline folder (reads ``subfolder``, e.g.
    ``"text_encoder_2"`` for SDXL's second encoder), or a Hugging Face repo id already in
    the local cache. ``dtype`` is the activation dtype, ``param_dtype`` (default: ``dtype``)
    the dtype the weights are stored in. The class (``CLIPTextModel`` or
    ``CLIPTextModelWithProjection``) comes from ``architectures`` in ``config.json``.
    ``mesh``: place the parameters on it (``sharding.LOGICAL_AXIS_RULES``).
    """
    dtype, param_dtype = dtypes(dtype, param_dtype)
    check_implementation(attention)
    folder, config = read_model_config(path, subfolder, TextEncoderConfig)
    graphdef, params = load_module(
        folder, lambda rngs: MODEL_CLASSES[config.architecture](
            config, attention=attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        param_dtype, stem="model", variant=variant, mesh=mesh, convert=_torch_layout_keys)
    return TextEncoder(config, graphdef, params, dtype=dtype, param_dtype=param_dtype, mesh=mesh)


# ----------------------------------------------------------------------------- tokenizer

def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def _tokenizer_folder(path, subfolder: str | None) -> Path:
    expected = "tokenizer.json, or vocab.json and merges.txt"
    local = Path(os.path.expanduser(str(path)))
    if local.is_dir():
        if _has_tokenizer_files(local):
            return local
        if subfolder and _has_tokenizer_files(local / subfolder):
            return local / subfolder
        where = f" nor in its {subfolder}/ subfolder" if subfolder else ""
        raise CheckpointError(f"{local} has no tokenizer files ({expected}){where}")
    root = cached_snapshot(path)
    return _tokenizer_folder(root, subfolder)


def quiet_transformers():
    """``import transformers`` without its advisory notes (without torch it says "PyTorch
    was not found. Models won't be available ...", which does not concern its tokenizers,
    all that retom-jax uses). Only the import is quieted: the variable that does it is
    restored afterwards, and an import made earlier is returned as it is."""
    if "transformers" not in sys.modules:
        name = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
        before = os.environ.get(name)
        os.environ[name] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before
    return sys.modules["transformers"]


def load_tokenizer(path, subfolder: str = "tokenizer"):
    """transformers' ``CLIPTokenizer`` from a tokenizer folder, a pipeline folder (reads
    ``subfolder``; SDXL's second one is ``"tokenizer_2"``) or a cached repo id. Local
    files only."""
    CLIPTokenizer = quiet_transformers().CLIPTokenizer
    folder = _tokenizer_folder(path, subfolder)
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"could not read the tokenizer in {folder}: {e}") from e


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None,
             labels: Sequence[str] | None = None, warn: bool = True) -> np.ndarray:
    """Token ids ``int32 [batch, max_length]`` as Stable Diffusion pipelines make them:
    BOS, the prompt, EOS, then padding to ``max_length`` (default
    ``tokenizer.model_max_length``, 77 for CLIP). A longer prompt is truncated (keeping
    EOS last) with a one-line warning naming it (``labels[i]``, default ``"prompt
    {i + 1}"``), its token count and where it was cut; ``warn=False`` skips it."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    if max_length is None:
        max_length = tokenizer.model_max_length
        if not isinstance(max_length, int) or max_length > 1_000_000:
            raise ValueError("the tokenizer sets no model_max_length: pass max_length "
                             "(the text encoder's max_position_embeddings)")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (room for BOS and EOS), "
                         f"got {max_length!r}")
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False).input_ids
    for i, ids in enumerate(full if warn else ()):
        if len(ids) > max_length:
            cut = tokenizer.decode(ids[max_length - 1:-1], skip_special_tokens=True).strip()
            cut = cut if len(cut) <= 30 else cut[:30].rstrip() + "..."
            label = labels[i] if labels is not None else f"prompt {i + 1}"
            warnings.warn(
                f"{label} has {len(ids)} tokens, the text encoder reads {max_length}: cut "
                f"before {cut!r} ({len(ids) - max_length} tokens dropped)", stacklevel=2)
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np").input_ids
    return np.asarray(ids, dtype=np.int32)
