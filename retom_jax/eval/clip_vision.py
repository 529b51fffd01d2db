"""CLIP's image tower with projection (transformers ``CLIPVisionModelWithProjection``),
CLIP's image preprocessing, and a whole ``CLIPModel`` (image and text towers) for the
CLIP score and CMMD.

The image tower shares its transformer layers with the text encoder in
:mod:`retom_jax.clip` (bidirectional attention instead of causal). Modules are named as
transformers names them (``vision_model.encoder.layers.0.self_attn.q_proj``,
``visual_projection``), so checkpoints map without special cases.

Typical use::

    clip = load_clip("openai/clip-vit-large-patch14")    # a folder or a cached repo id
    emb = clip.image_embeds(clip.preprocess(pil_images))  # [B, projection_dim]
    scores = clip_scores(clip, pil_images, prompts)      # 100 * cosine, per image
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.attention import check_implementation
from ..models.clip import MODEL_CLASSES, CLIPEncoder, TextEncoder, TextEncoderConfig, check_encoder_fields, load_tokenizer, tokenize
from ..models.layers import layer_norm, linear
from ..models.weights import CheckpointError, LoadedModel, cached_snapshot, config_errors, config_fields, load_module, parse_dtype, read_config, read_json

__all__ = ["VisionConfig", "CLIPVisionModelWithProjection", "ImageEncoder", "CLIP",
           "ImageProcessor", "load_clip", "clip_scores", "clip_score"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# What the CLIP score is usually computed with (torchmetrics' default), and the model
# google-research's CMMD uses; the error for a missing model names them.
DEFAULT_CLIP = "openai/clip-vit-large-patch14"

@dataclass(frozen=True)
class VisionConfig:
    """The fields of a transformers ``CLIPVisionConfig`` the forward pass needs, plus the
    projection width (``projection_dim``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        check_encoder_fields(self, ("image_size", "patch_size", "num_channels",
                                    "projection_dim"))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> "VisionConfig":
        """Read a transformers ``CLIPVisionConfig`` dict (with ``projection_dim``);
        ``CheckpointError`` starting with ``where`` when it does not make a model."""
        with config_errors(where):
            return cls(**config_fields(cls, raw))


# ----------------------------------------------------------------------------- modules

class CLIPVisionEmbeddings(nnx.Module):
    """Class token, ``patch_size``-strided patch convolution (no bias), positions."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs):
        c, p = config.hidden_size, config.patch_size
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (c,), param_dtype) * c ** -0.5)
        self.patch_embedding = nnx.Conv(config.num_channels, c, (p, p), strides=(p, p),
                                        padding="VALID", use_bias=False, dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(config.num_patches + 1, c, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, pixel_values_nchw):
        x = jnp.transpose(pixel_values_nchw, (0, 2, 3, 1)).astype(self.dtype)
        patches = self.patch_embedding(x)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype),
                               (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        positions = jnp.arange(x.shape[1], dtype=jnp.int32)
        return x + self.position_embedding(positions)[None]


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, config: VisionConfig, *, attention="auto", dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPVisionEmbeddings(config, **kw)
        self.pre_layrnorm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)  # sic
        self.encoder = CLIPEncoder(config, attention=attention, causal=False, **kw)
        self.post_layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(self, pixel_values):
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        last = self.encoder(x)[-1]
        return last, self.post_layernorm(last[:, 0])


class CLIPVisionModelWithProjection(nnx.Module):
    """``(last_hidden_state, pooler_output, image_embeds)`` of NCHW pixel values."""

    def __init__(self, config: VisionConfig, *, attention="auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs):
        self.vision_model = CLIPVisionTransformer(config, attention=attention, dtype=dtype,
                                                  param_dtype=param_dtype, rngs=rngs)
        self.visual_projection = linear(config.hidden_size, config.projection_dim, bias=False,
                                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values):
        last, pooled = self.vision_model(pixel_values)
        return last, pooled, self.visual_projection(pooled)


# ----------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class ImageProcessor:
    """CLIP's preprocessing as transformers' ``CLIPImageProcessor`` does it: the shortest
    side resized to ``size`` (PIL bicubic, the long side ``int(size * long / short)``),
    a centre crop of ``crop_size``, ``/ 255``, then ``(x - mean) / std``."""

    size: int = 224
    crop_size: tuple = (224, 224)
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    @classmethod
    def from_folder(cls, folder: Path, image_size: int) -> "ImageProcessor":
        """``preprocessor_config.json`` of a model folder, or CLIP's defaults at the
        model's ``image_size``."""
        if not (Path(folder) / "preprocessor_config.json").is_file():
            return cls(image_size, (image_size, image_size))
        raw = read_json(folder, "preprocessor_config.json")
        size = raw.get("size", image_size)
        size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
        crop = raw.get("crop_size", image_size)
        crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
        try:
            return cls(int(size), (int(crop[0]), int(crop[1])),
                       tuple(float(v) for v in raw.get("image_mean", CLIP_MEAN)),
                       tuple(float(v) for v in raw.get("image_std", CLIP_STD)))
        except (TypeError, ValueError):
            raise CheckpointError(f"{folder}/preprocessor_config.json: unreadable size, "
                                  f"crop_size, image_mean or image_std") from None

    def __call__(self, images) -> np.ndarray:
        """float32 ``[B, 3, crop_h, crop_w]`` from PIL images or uint8 ``[H, W, 3]`` arrays."""
        from PIL import Image

        out = []
        for image in _image_list(images):
            if not isinstance(image, Image.Image):
                image = Image.fromarray(_as_uint8(image))
            image = image.convert("RGB")
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.size * long / short)
            new_w, new_h = (self.size, new_long) if w <= h else (new_long, self.size)
            array = np.asarray(image.resize((new_w, new_h), Image.BICUBIC))
            ch, cw = self.crop_size
            if new_h < ch or new_w < cw:
                raise ValueError(f"resized image {new_h}x{new_w} is smaller than the crop "
                                 f"{ch}x{cw}")
            top, left = (new_h - ch) // 2, (new_w - cw) // 2
            array = array[top:top + ch, left:left + cw].astype(np.float64) / 255.0
            array = (array - np.asarray(self.mean)) / np.asarray(self.std)
            out.append(array.transpose(2, 0, 1).astype(np.float32))
        return np.stack(out)


def _image_list(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)) and images:
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 3:
        return [images]
    try:
        from PIL import Image
        if isinstance(images, Image.Image):
            return [images]
    except ImportError:  # pragma: no cover
        pass
    raise ValueError("images must be a non-empty list of PIL images or [H, W, 3] arrays, "
                     "or a [B, H, W, 3] array")


def _as_uint8(image) -> np.ndarray:
    """uint8 ``[H, W, 3]``: uint8 as is, floats in [0, 1] scaled and rounded."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"images must be uint8 or floats in [0, 1], got {a.dtype}")
    return (np.clip(a, 0.0, 1.0) * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- wrappers

class ImageEncoder(LoadedModel):
    """A loaded CLIP image tower with projection (`weights.LoadedModel`: ``config``,
    ``graphdef``, ``params``, ``dtype``), with its image ``processor``.

    ``apply(params, pixel_values)`` is pure; ``encoder(pixel_values)`` runs it jitted and
    returns ``(last_hidden_state, pooler_output, image_embeds)``."""

    def __init__(self, config: VisionConfig, graphdef, params, processor: ImageProcessor,
                 dtype):
        super().__init__(config, graphdef, params, dtype=dtype)
        self.processor = processor
        self._jitted = jax.jit(self.apply)

    def apply(self, params, pixel_values):
        return nnx.merge(self.graphdef, params)(pixel_values)

    def __call__(self, pixel_values):
        shape = tuple(np.shape(pixel_values))
        s, c = self.config.image_size, self.config.num_channels
        if len(shape) != 4 or shape[1:] != (c, s, s):
            raise ValueError(f"pixel_values must be [batch, {c}, {s}, {s}] (NCHW, the "
                             f"model's image_size), got shape {list(shape)}")
        x = pixel_values
        if self.mesh is not None:  # the batch split over data x fsdp (metrics.shard_models)
            from ..sharding import shard_batch

            x = shard_batch(np.asarray(x, np.float32), self.mesh)
        return self._jitted(self.params, jnp.asarray(x, jnp.float32))

    def image_embeds(self, pixel_values) -> jax.Array:
        return self(pixel_values)[2]

    def __repr__(self):
        c = self.config
        return (f"ImageEncoder(layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"image_size={c.image_size}, patch={c.patch_size}, "
                f"projection={c.projection_dim}, dtype={self.dtype.name})")


@dataclass
class CLIP:
    """A CLIP model for evaluation: the image tower, and (from a ``CLIPModel`` folder)
    the text tower with projection and the tokenizer (None for an image-only folder)."""

    vision: ImageEncoder
    text: TextEncoder | None = None
    tokenizer: object = None
    source: str = ""

    def preprocess(self, images) -> np.ndarray:
        return self.vision.processor(images)

    def image_embeds(self, pixel_values) -> jax.Array:
        return self.vision.image_embeds(pixel_values)

    def text_embeds(self, prompts: Sequence[str]) -> jax.Array:
        if self.text is None or self.tokenizer is None:
            raise ValueError(f"the CLIP model {self.source} has no text tower or tokenizer "
                             f"(a CLIPModel folder with its tokenizer files is needed for "
                             f"the CLIP score)")
        ids = tokenize(self.tokenizer, list(prompts),
                       max_length=self.text.config.max_position_embeddings)
        return self.text(ids).text_embeds


def _split(state: dict, prefixes: tuple) -> dict:
    return {k: v for k, v in state.items()
            if k.split(".", 1)[0] in prefixes and not k.endswith("position_ids")}


def _clip_folder(path_or_repo_id) -> Path:
    path = Path(os.path.expanduser(str(path_or_repo_id)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not a CLIP model folder")
        return path
    if str(path_or_repo_id).count("/") != 1 or str(path_or_repo_id).startswith((".", "/", "~")):
        raise CheckpointError(
            f"CLIP model {path_or_repo_id!r} not found: pass a local folder of a transformers "
            f"CLIPModel (config.json, model.safetensors, tokenizer files) or a repo id in the "
            f"local Hugging Face cache, e.g. {DEFAULT_CLIP}")
    try:
        return cached_snapshot(path_or_repo_id, what="local CLIP folder")
    except CheckpointError:
        raise CheckpointError(
            f"CLIP model {path_or_repo_id!r} is not in the local Hugging Face cache: put "
            f"{path_or_repo_id} there (`hf download {path_or_repo_id}` on a machine with "
            f"network) or pass a local folder; retom-jax never downloads") from None


def _clip_configs(raw: dict, where: str):
    """``(VisionConfig, TextEncoderConfig or None)`` of a ``CLIPModel`` or
    ``CLIPVisionModelWithProjection`` config.json."""
    archs = raw.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else list(archs)
    if "CLIPVisionModelWithProjection" in archs and "CLIPModel" not in archs:
        return VisionConfig.from_dict(raw, where), None
    if "CLIPModel" not in archs:
        raise CheckpointError(f"{where} declares architecture(s) {archs}; the evaluation "
                              f"needs CLIPModel or CLIPVisionModelWithProjection")
    # one projection width, at the top level, for both towers
    projection_dim = raw.get("projection_dim", VisionConfig.projection_dim)
    vision = VisionConfig.from_dict(
        dict(raw.get("vision_config") or {}, projection_dim=projection_dim), where)
    text_raw = dict(raw.get("text_config") or {}, projection_dim=projection_dim,
                    architectures=["CLIPTextModelWithProjection"])
    return vision, TextEncoderConfig.from_dict(text_raw, where=f"{where} (text_config)")


def load_clip(path_or_repo_id=DEFAULT_CLIP, dtype=jnp.float32, *, attention="auto") -> CLIP:
    """A transformers ``CLIPModel`` (image + text towers, tokenizer when present) or
    ``CLIPVisionModelWithProjection`` (image tower only) from a local folder or a repo id
    in the local Hugging Face cache. Never downloads."""
    dtype = parse_dtype(dtype)
    check_implementation(attention)
    folder = _clip_folder(path_or_repo_id)
    where = str(folder / "config.json")
    vision_cfg, text_cfg = _clip_configs(read_config(folder), where)

    def load(build, prefixes):
        return load_module(folder, build, dtype, stem="model",
                           convert=lambda state: _split(state, prefixes))

    graphdef, params = load(lambda rngs: CLIPVisionModelWithProjection(
        vision_cfg, attention=attention, dtype=dtype, param_dtype=dtype, rngs=rngs),
        ("vision_model", "visual_projection"))
    vision = ImageEncoder(vision_cfg, graphdef, params,
                          ImageProcessor.from_folder(folder, vision_cfg.image_size), dtype)
    text = tokenizer = None
    if text_cfg is not None:
        tgraph, tparams = load(lambda rngs: MODEL_CLASSES[text_cfg.architecture](
            text_cfg, attention=attention, dtype=dtype, param_dtype=dtype, rngs=rngs),
            ("text_model", "text_projection"))
        text = TextEncoder(text_cfg, tgraph, tparams, dtype=dtype, param_dtype=dtype)
        try:
            tokenizer = load_tokenizer(folder, subfolder=None)
        except CheckpointError:
            tokenizer = None
    return CLIP(vision, text, tokenizer, str(path_or_repo_id))


# ----------------------------------------------------------------------------- CLIP score

def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_scores(clip: CLIP, images, prompts: Sequence[str], batch_size: int = 16
                ) -> np.ndarray:
    """``100 * cos(image_embeds, text_embeds)`` per (image, prompt) pair, float64 ``[N]``."""
    images = _image_list(images)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: one prompt per "
                         f"image")
    img = image_embeddings(clip, images, batch_size)
    txt = np.concatenate([np.asarray(clip.text_embeds(prompts[i:i + batch_size]))
                          for i in range(0, len(prompts), batch_size)])
    return 100.0 * np.sum(_unit(img) * _unit(txt), axis=-1)


def clip_score(clip: CLIP, images, prompts: Sequence[str], batch_size: int = 16) -> float:
    """The CLIP score as torchmetrics computes it: ``max(mean(100 * cos), 0)``."""
    return max(float(np.mean(clip_scores(clip, images, prompts, batch_size))), 0.0)


def image_embeddings(clip: CLIP, images, batch_size: int = 16) -> np.ndarray:
    """Projected CLIP image embeddings (not normalised) of images preprocessed as
    ``CLIPImageProcessor`` does, in batches padded to ``batch_size`` (one compile)."""
    images = _image_list(images)
    out = []
    for i in range(0, len(images), batch_size):
        pix = clip.preprocess(images[i:i + batch_size])
        out.append(np.asarray(clip.image_embeds(_pad(pix, batch_size)))[:len(pix)])
    return np.concatenate(out)


def _pad(batch: np.ndarray, size: int) -> np.ndarray:
    if len(batch) == size:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])
