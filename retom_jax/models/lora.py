"""LoRA files read and fused into the weights at load (``pipe.load_lora(file, scale)``).

A LoRA adds ``scale * (alpha / r) * up @ down`` to a layer's weight (``down``: ``[r, in]``
or ``[r, in, kh, kw]`` for a convolution, ``up``: ``[out, r]`` or ``[out, r, 1, 1]``).
Fused once at load, it costs nothing per step, and the compiled sampling programs stay
valid (the weights are their arguments).

Key layouts read (what diffusers' ``load_lora_weights`` reads for SD / SDXL, Flux and
SD3):

- diffusers / peft: ``unet.<module>.lora_A.weight`` and ``.lora_B.weight`` (also
  ``transformer.`` for Flux / SD3, ``text_encoder.`` and ``text_encoder_2.``), alpha from the file's
  ``lora_adapter_metadata`` (``<component>.lora_alpha``, ``alpha_pattern``,
  ``use_rslora``) or from ``<module>.alpha`` keys, else alpha = rank (scale 1). The older
  diffusers names (``.lora.down.weight`` / ``.lora.up.weight``,
  ``.lora_linear_layer.down/up``, ``.processor.to_q_lora.down.weight``) too.
- kohya: ``lora_unet_<module with "_" for ".">.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, ``lora_te_`` (SD's text encoder), ``lora_te1_`` / ``lora_te2_`` (SDXL's two).
  Names are resolved against the model's own layer names, so underscores inside names
  (``to_q``, ``proj_in``) are never ambiguous. UNet names in the original SGM block layout
  (``input_blocks_4_1_...``, what sd-scripts writes for SDXL) are mapped by
  :func:`sgm_to_diffusers`. For a Flux pipeline ``lora_unet_`` names its transformer in
  the original (BFL) layout, ``double_blocks_<i>_img_attn_qkv``,
  ``single_blocks_<i>_linear1``, ... (:func:`flux_kohya_targets`): a fused layer's update
  ``up @ down`` is split by output rows over the separate diffusers layers (q, k, v and,
  for ``linear1``, the MLP's input projection), the sizes read from the model.

A key that matches no layer, a missing half of a pair, or an update whose shape does not
fit the layer is a :class:`LoraError` naming it. The helpers (:func:`parse_lora_key`,
:func:`kohya_name`, :func:`diffusers_keys`, :func:`module_table`, :func:`lora_delta`)
are public so that a LoRA writer can produce exactly what this reader reads.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .weights import (CheckpointError, check_finite, read_safetensors,
                      read_safetensors_metadata, to_flax_layout, torch_key)

__all__ = ["LoraError", "LoraLayer", "LoraFile", "COMPONENTS", "KOHYA_PREFIXES",
           "parse_lora_key", "kohya_name", "diffusers_keys", "sgm_to_diffusers", "flux_kohya_targets",
           "module_table", "lora_delta",
           "read_lora", "fuse_lora", "load_lora_into", "parse_lora_spec", "LORA_FILE_NAME"]

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
LORA_FILE_NAME = "pytorch_lora_weights.safetensors"  # what diffusers and `train` write
# kohya prefix -> component (SD's "lora_te_" is its only text encoder)
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# key suffix -> role; the longest match wins
_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = ("lora_magnitude_vector", "dora_scale", "hada_", "lokr_", ".lora_B.bias",
                ".lora_up.bias", ".diff", ".diff_b")


class LoraError(CheckpointError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclasses.dataclass
class LoraLayer:
    """One layer's LoRA in PyTorch layout: ``down`` (A) ``[r, in(, kh, kw)]``, ``up``
    (B) ``[out, r(, 1, 1)]``, ``alpha`` (None: alpha = r)."""
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclasses.dataclass
class LoraFile:
    """A read LoRA file: ``layers[component][module]``, where ``module`` is the layer's
    dotted PyTorch name (diffusers layout) or its underscored kohya name (``kohya``)."""
    path: str
    layers: dict
    kohya: bool = False


# ----------------------------------------------------------------------------- names

def parse_lora_key(key: str) -> tuple[str, str, str]:
    """``(component, module, role)`` of one LoRA key; ``role`` is ``"down"``, ``"up"``
    or ``"alpha"``. ``module`` is dotted for the diffusers layout, underscored (as
    written) for kohya. Raises :class:`LoraError` for anything else."""
    for bad in _UNSUPPORTED:
        if bad in key:
            raise LoraError(f"key {key!r} belongs to a LoRA variant that is not supported "
                            f"(DoRA, LyCORIS, bias or full-weight diffs): only plain LoRA is")
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        raise LoraError(f"key {key!r} is not a LoRA weight (expected .lora_A/.lora_B, "
                        f".lora_down/.lora_up or .alpha)")
    for prefix, component in sorted(KOHYA_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if stem.startswith(prefix):
            return component, stem[len(prefix):], role
    component, _, module = stem.partition(".")
    if component not in COMPONENTS or not module:
        raise LoraError(f"key {key!r} names no model: LoRA keys start with unet., "
                        f"transformer., text_encoder., text_encoder_2. or lora_unet_, "
                        f"lora_te_, lora_te1_, lora_te2_")
    # diffusers' older attention-processor names: attn1.processor.to_q_lora -> attn1.to_q
    match = re.fullmatch(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora", module)
    if match:
        module = f"{match[1]}.{match[2]}" + (".0" if match[2] == "to_out" else "")
    return component, module, role


def kohya_name(component: str, module: str) -> str:
    """The kohya stem of a layer (``"lora_unet_down_blocks_0_..._to_q"``) from its dotted
    PyTorch name; SDXL's second text encoder is ``lora_te2_``. Append ``.lora_down.weight``,
    ``.lora_up.weight`` or ``.alpha``."""
    prefix = {"unet": "lora_unet_", "transformer": "lora_unet_", "text_encoder": "lora_te_",
              "text_encoder_2": "lora_te2_"}.get(component)
    if prefix is None:
        raise ValueError(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}")
    return prefix + module.replace(".", "_")


_SGM_RESNET = (("in_layers_2", "conv1"), ("out_layers_3", "conv2"),
               ("emb_layers_1", "time_emb_proj"), ("skip_connection", "conv_shortcut"))
_SGM_FIXED = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
              "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
              "out_2": "conv_out", "input_blocks_0_0": "conv_in"}


def sgm_to_diffusers(name: str, layers_per_block: int, has=lambda name: True) -> str | None:
    """A kohya UNet name in the original (SGM/LDM) block layout, as sd-scripts writes for
    SDXL (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``), as the underscored
    diffusers name (``down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``); None
    when ``name`` is not in that layout. Input block ``k > 0`` is level
    ``(k - 1) // (L + 1)``, item ``(k - 1) % (L + 1)`` (the last item: the downsampler);
    output block ``k`` is level ``k // (L + 1)``, item ``k % (L + 1)``; within a block,
    0 is the resnet, 1 the attention (an up block without one: the upsampler), 2 the
    upsampler. ``has(name)`` tells whether a diffusers name exists (picks the up block's
    item 1)."""
    for old, new in _SGM_FIXED.items():
        if name == old or name.startswith(old + "_"):
            return new + name[len(old):]
    L = layers_per_block
    m = re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        k, j, rest = int(m[1]), int(m[2]), m[3]
        level, item = (k - 1) // (L + 1), (k - 1) % (L + 1)
        if item == L:  # the downsampler: input_blocks_k_0_op
            return f"down_blocks_{level}_downsamplers_0_{rest.replace('op', 'conv', 1)}"
        kind = ("resnets", "attentions")[j] if j < 2 else None
        return None if kind is None else f"down_blocks_{level}_{kind}_{item}_{_resnet(rest, kind)}"
    m = re.fullmatch(r"middle_block_(\d+)_(.+)", name)
    if m:
        kind = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(int(m[1]))
        return None if kind is None else f"mid_block_{kind}_{_resnet(m[2], kind)}"
    m = re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        k, j, rest = int(m[1]), int(m[2]), m[3]
        level, item = k // (L + 1), k % (L + 1)
        if j == 0:
            return f"up_blocks_{level}_resnets_{item}_{_resnet(rest, 'resnets')}"
        attention = f"up_blocks_{level}_attentions_{item}_{rest}"
        if j == 1 and has(attention):
            return attention
        return f"up_blocks_{level}_upsamplers_0_{rest}"
    return None


def _resnet(rest: str, kind: str) -> str:
    if not kind.startswith("resnets"):
        return rest
    for old, new in _SGM_RESNET:
        if rest == old or rest.startswith(old + "_"):
            return new + rest[len(old):]
    return rest


# BFL (original Flux) layer -> the diffusers layers it stands for, in its output-row order
_FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",)}
_FLUX_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                "linear2": ("proj_out",), "modulation_lin": ("norm.linear",)}
_FLUX_OUTER = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear"}


def flux_kohya_targets(name: str) -> tuple[tuple[str, ...], bool] | None:
    """A kohya / sd-scripts Flux layer name in the original BFL layout (without
    ``lora_unet_``: ``double_blocks_0_img_attn_qkv``, ``single_blocks_3_linear1``,
    ``final_layer_linear``) as ``(diffusers layers, swap)``: the dotted names of the
    layers whose weights, stacked by output rows in this order, form the BFL layer's
    weight; ``swap``: the BFL layer's two output halves are in the other order
    (``final_layer_adaLN_modulation_1`` is (shift, scale), diffusers' ``norm_out`` (scale,
    shift)). None when ``name`` is not in that layout."""
    m = re.fullmatch(r"(double|single)_blocks_(\d+)_(.+)", name)
    if m:
        table, prefix = ((_FLUX_DOUBLE, "transformer_blocks") if m[1] == "double"
                         else (_FLUX_SINGLE, "single_transformer_blocks"))
        parts = table.get(m[3])
        return None if parts is None else (tuple(f"{prefix}.{m[2]}.{p}" for p in parts), False)
    if name in _FLUX_OUTER:
        return (_FLUX_OUTER[name],), name == "final_layer_adaLN_modulation_1"
    return None


def diffusers_keys(component: str, module: str) -> tuple[str, str]:
    """The diffusers / peft keys ``(down, up)`` of a layer:
    ``"<component>.<module>.lora_A.weight"`` and ``"....lora_B.weight"``."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}")
    return f"{component}.{module}.lora_A.weight", f"{component}.{module}.lora_B.weight"


def module_table(params) -> dict[str, tuple]:
    """Every LoRA-able layer of a model's parameters (Linear and Conv2d kernels):
    ``{dotted PyTorch module name: parameter path}``."""
    table = {}
    for path, value in nnx.to_flat_state(params):
        if str(path[-1]) == "kernel" and np.ndim(_value(value)) in (2, 4):
            table[torch_key(path)[: -len(".weight")]] = path
    return table


def _value(v):
    return v.value if hasattr(v, "value") and not hasattr(v, "shape") else v


def _normalize(component: str, module: str, table: dict) -> str:
    """Text encoders: transformers 5 names its layers without ``text_model.``; ours have it."""
    if component != "unet" and module not in table and f"text_model.{module}" in table:
        return f"text_model.{module}"
    return module


# ----------------------------------------------------------------------------- reading

def read_lora(path) -> LoraFile:
    """Read a LoRA ``.safetensors`` file (diffusers/peft or kohya layout) into
    :class:`LoraFile`, checking that every layer has both halves of consistent rank. A
    folder stands for its ``pytorch_lora_weights.safetensors`` (what ``retom-jax train``
    and diffusers' ``save_lora_weights`` write), or its only ``.safetensors`` file."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():  # the folder `retom-jax train` (or diffusers) wrote
        files = ([path / LORA_FILE_NAME] if (path / LORA_FILE_NAME).is_file()
                 else sorted(path.glob("*.safetensors")))
        if len(files) != 1:
            raise LoraError(f"{path} is a folder without {LORA_FILE_NAME}"
                            + (f" and with {len(files)} .safetensors files: name one" if files
                               else " or any .safetensors file"))
        path = files[0]
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: only .safetensors LoRA files are read (pickled .bin/.pt/.ckpt "
                        f"files can run code: convert them to safetensors)")
    try:
        tensors = read_safetensors(path)
        meta = read_safetensors_metadata(path)
    except CheckpointError as e:
        raise LoraError(f"LoRA file {e}") from None
    if not tensors:
        raise LoraError(f"{path} holds no tensors: not a LoRA file")
    layers: dict = {}
    kinds = set()
    for key, array in tensors.items():
        try:
            component, module, role = parse_lora_key(key)
        except LoraError as e:
            raise LoraError(f"{path}: {e}") from None
        kinds.add(key.startswith("lora_"))
        layer = layers.setdefault(component, {}).setdefault(module, LoraLayer())
        if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
            raise LoraError(f"{path}: {key} has dtype {array.dtype}, not numbers")
        values = np.asarray(array, np.float32)
        if not np.all(np.isfinite(values)):
            raise LoraError(f"{path}: {key} holds NaN or infinite values (as float32): "
                            f"refusing to fuse it")
        if role == "alpha":
            if values.size != 1:
                raise LoraError(f"{path}: {key} holds {values.size} values, an alpha is one")
            layer.alpha = float(values.reshape(-1)[0])
        else:
            setattr(layer, role, values)
    if len(kinds) > 1:
        raise LoraError(f"{path} mixes kohya (lora_unet_...) and diffusers (unet....) keys")
    kohya = kinds == {True}
    alphas = _metadata_alphas(meta, path)
    for component, mods in layers.items():
        for module, layer in mods.items():
            where = f"{path}: {component} layer {module!r}"
            if layer.down is None or layer.up is None:
                half = "down (lora_A)" if layer.down is None else "up (lora_B)"
                raise LoraError(f"{where} has no {half} weight")
            if layer.down.ndim not in (2, 4) or layer.up.ndim != layer.down.ndim:
                raise LoraError(f"{where}: down {list(layer.down.shape)} and up "
                                f"{list(layer.up.shape)} are not a LoRA pair")
            if layer.up.shape[1] != layer.down.shape[0]:
                raise LoraError(f"{where}: down has rank {layer.down.shape[0]} but up has "
                                f"{layer.up.shape[1]}")
            if layer.up.ndim == 4 and layer.up.shape[2:] != (1, 1):
                raise LoraError(f"{where}: a convolution's up weight must be 1x1, got "
                                f"{list(layer.up.shape)}")
            if layer.rank == 0:
                raise LoraError(f"{where} has rank 0")
            if layer.alpha is None and component in alphas:
                layer.alpha = alphas[component](module, layer.rank)
            if layer.alpha is not None and not np.isfinite(layer.alpha):
                raise LoraError(f"{where}: its alpha {layer.alpha} is not a finite number")
    return LoraFile(str(path), layers, kohya)


def _metadata_alphas(meta: dict, path) -> dict:
    """Per component, ``f(module, rank) -> alpha`` from diffusers' ``lora_adapter_metadata``
    (a peft ``LoraConfig`` per component, keys prefixed ``unet.`` ...)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraError(f"{path}: its lora_adapter_metadata is not valid JSON") from None
    if not isinstance(config, dict):
        raise LoraError(f"{path}: its lora_adapter_metadata is not a JSON object")
    out = {}
    for component in COMPONENTS:
        cfg = {k[len(component) + 1:]: v for k, v in config.items()
               if k.startswith(component + ".")}
        if not cfg:
            continue
        if cfg.get("use_dora"):
            raise LoraError(f"{path}: {component} is a DoRA adapter (use_dora), which is not "
                            f"supported")
        alpha = cfg.get("lora_alpha")
        pattern = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora"))
        numbers = [alpha, *pattern.values()] if isinstance(pattern, dict) else None
        if numbers is None or not all(
                a is None or (isinstance(a, (int, float)) and not isinstance(a, bool)
                              and math.isfinite(a)) for a in numbers):
            raise LoraError(f"{path}: its lora_adapter_metadata gives {component} a "
                            f"lora_alpha / alpha_pattern that is not finite numbers")
        try:
            pattern = {re.compile(rf"(.*\.)?{key}"): value for key, value in pattern.items()}
        except re.error as e:
            raise LoraError(f"{path}: its lora_adapter_metadata has an alpha_pattern that is "
                            f"not a regular expression ({e})") from None

        def alpha_of(module, rank, alpha=alpha, pattern=pattern, rslora=rslora):
            a = alpha
            for key, value in pattern.items():  # peft matches a pattern as a name suffix
                if key.fullmatch(module):
                    a = value
                    break
            if a is None:
                return None
            # rsLoRA scales by alpha / sqrt(r): expressed as the alpha giving that ratio
            return float(a) * (np.sqrt(rank) if rslora else 1.0)

        out[component] = alpha_of
    return out


# ----------------------------------------------------------------------------- fusing

def lora_delta(layer: LoraLayer, scale: float = 1.0) -> np.ndarray:
    """``scale * (alpha / r) * up @ down`` in PyTorch layout (``[out, in]`` or
    ``[out, in, kh, kw]``), float32."""
    r = layer.rank
    factor = scale * ((layer.alpha if layer.alpha is not None else r) / r)
    down = layer.down.reshape(r, -1).astype(np.float32)
    up = layer.up.reshape(layer.up.shape[0], r).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # checked where it is fused
        delta = (up @ down) * np.float32(factor)
    return delta.reshape((layer.up.shape[0],) + layer.down.shape[1:])


def fuse_lora(params, layers: dict, scale: float = 1.0, *, component: str = "unet",
              kohya: bool = False, where: str = "LoRA"):
    """``params`` (one model's) with every layer's LoRA update added; the rest shared.
    ``layers``: ``{module: LoraLayer}`` as :func:`read_lora` gives them for ``component``."""
    table = module_table(params)
    by_kohya = {name.replace(".", "_"): name for name in table} if kohya else None
    if kohya and component == "unet":  # SGM block names (kohya's SDXL files)
        per_level = [n for n in table if re.fullmatch(r"down_blocks\.0\.resnets\.\d+\.conv1", n)]
        sgm = {m: sgm_to_diffusers(m, len(per_level), by_kohya.__contains__) for m in layers}
        origin = {(sgm[m] or m): m for m in layers}
        layers = {(sgm[m] or m): layer for m, layer in layers.items()}
    else:
        origin = {m: m for m in layers}
    flat = dict(nnx.to_flat_state(params))
    changed = {}
    for module, layer in layers.items():
        bfl = flux_kohya_targets(module) if kohya and component == "transformer" else None
        names, swap = bfl if bfl is not None else (
            (by_kohya.get(module) if kohya else _normalize(component, module, table),), False)
        if any(name is None or name not in table for name in names):
            shown = (kohya_name(component, origin[module]) if kohya
                     else f"{component}.{module}")
            raise LoraError(f"{where}: {shown!r} matches no layer of the {component}")
        delta = lora_delta(layer, scale)
        if swap:  # BFL's (shift, scale) halves -> diffusers' (scale, shift)
            delta = np.concatenate(np.split(delta, 2)[::-1])
        if len(names) > 1:  # a fused BFL layer: its output rows split over the layers
            rows = [int(np.shape(_value(flat[table[n]]))[-1]) for n in names]
            if delta.shape[0] != sum(rows):
                raise LoraError(f"{where}: the update for {component} layer "
                                f"{kohya_name(component, origin[module])!r} has "
                                f"{delta.shape[0]} output rows but {', '.join(names)} have "
                                f"{' + '.join(map(str, rows))}")
            pieces = np.split(delta, np.cumsum(rows)[:-1])
        else:
            pieces = [delta]
        for name, piece in zip(names, pieces):
            path = table[name]
            old = _value(flat[path])
            want = tuple(np.shape(old))
            update = to_flax_layout(piece, "kernel")
            if update.shape != want:
                torch_shape = (list(want[::-1]) if len(want) == 2
                               else [want[3], want[2], want[0], want[1]])
                raise LoraError(f"{where}: the update for {component} layer {name!r} has "
                                f"shape {list(piece.shape)} but the layer's weight is "
                                f"{torch_shape}")
            flat[path] = (jnp.asarray(old, jnp.float32) + jnp.asarray(update)).astype(old.dtype)
            changed[f"{component} layer {name}"] = flat[path]
    check_finite(changed, f"{where}: the {component} weights with this LoRA fused in (scale "
                 f"{scale})", LoraError)
    return nnx.from_flat_state(flat)


def _check_scale(scale) -> float:
    if (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating))
            or not np.isfinite(scale)):
        raise LoraError(f"LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def load_lora_into(pipe, path, scale: float = 1.0) -> None:
    """Fuse the LoRA file ``path`` times ``scale`` into ``pipe``'s UNet (or diffusion
    transformer: Flux, SD3) and text encoders.
    Everything is checked before any model changes; the changed models are new objects
    (a pipeline sharing the old ones, e.g. from ``with_scheduler``, keeps them)."""
    scale = _check_scale(scale)
    lora = read_lora(path)
    fused = {}
    for component, layers in lora.layers.items():
        if (component == "unet" and lora.kohya and getattr(pipe, "unet", None) is None
                and getattr(pipe, "transformer", None) is not None):
            component = "transformer"  # lora_unet_ names a Flux transformer's layers
        model = getattr(pipe, component, None)
        if model is None:
            raise LoraError(f"{lora.path} has {component} layers but a "
                            f"{type(pipe).__name__} has no {component}")
        fused[component] = fuse_lora(model.params, layers, scale, component=component,
                                     kohya=lora.kohya, where=lora.path)
    for component, params in fused.items():
        model = copy.copy(getattr(pipe, component))
        model.params = params
        setattr(pipe, component, model)


def parse_lora_spec(spec) -> tuple[str, float]:
    """``"file.safetensors"``, ``"file.safetensors:0.7"``, ``(file, scale)`` or a path ->
    ``(file, scale)``; the CLI's ``--lora FILE[:SCALE]``."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise LoraError(f"a LoRA entry is a file or (file, scale), got {spec!r}")
        return os.fspath(spec[0]), _check_scale(spec[1])
    if isinstance(spec, os.PathLike):
        return os.fspath(spec), 1.0
    if not isinstance(spec, str):
        raise LoraError(f"a LoRA entry is a file or (file, scale), got {spec!r}")
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists():
        try:
            value = float(tail)
        except ValueError:
            raise LoraError(f"{spec!r}: the scale after ':' must be a number, got "
                            f"{tail!r}") from None
        if not np.isfinite(value):
            raise LoraError(f"{spec!r}: the scale after ':' must be a finite number, got "
                            f"{tail!r}")
        return head, value
    return spec, 1.0
