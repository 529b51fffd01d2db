"""Writing a pipeline as a diffusers folder (the layout ``load_pipeline`` and diffusers'
``from_pretrained`` read): ``model_index.json``, and per component its ``config.json`` (or
``scheduler_config.json``, tokenizer files) and safetensors weights in PyTorch layout.

``save_pipeline(load_pipeline("demo"), "demo-sd")`` turns the built-in demo model into a
folder that ``retom-jax generate --model demo-sd`` (and diffusers) load.

This is the one writer of weights: :func:`save_pipeline`, :func:`save_unet` (what
``retom-jax train`` writes after full fine-tuning), :func:`save_params` (one component) all
go through :func:`torch_state_dict` (PyTorch names and layouts, gathered from a mesh) and
:func:`write_safetensors`.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import jax
import numpy as np

from ..io import atomic_write, write_json, write_text
from ..models import weights
from ..schedulers import SCHEDULER_CLASSES

__all__ = ["save_pipeline", "save_unet", "save_params", "torch_state_dict",
           "write_safetensors", "is_writer"]

_ST_NAMES = {np.dtype(v): k for k, v in weights.ST_DTYPES.items()}


def is_writer() -> bool:
    """Whether this process writes files: process 0 of a multi-host run (the others hold
    the same gathered arrays and would write the same bytes to the same shared folder)."""
    return jax.process_index() == 0


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write ``{name: array}`` as a safetensors file (``metadata``: string to string),
    atomically (a temporary file renamed into place). Only process 0 writes (see
    :func:`is_writer`); every process returns the path."""
    path = Path(path)
    if not is_writer():
        return path
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
        if a.dtype not in _ST_NAMES:
            raise TypeError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a.tobytes())
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)

    return atomic_write(path, write)


def host_copy(a) -> np.ndarray:
    """An array (sharded over a mesh, possibly over several hosts) as one NumPy array."""
    from ..sharding import to_host

    return to_host(getattr(a, "value", a))


def path_key(path) -> str:
    """The PyTorch module name of a parameter path, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``."""
    from ..sharding import flat_path

    return weights.torch_key(flat_path(path))


def _torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:  # (in, out) -> Linear (out, in)
        return array.T
    if leaf == "kernel" and array.ndim == 4:  # HWIO -> OIHW
        return array.transpose(3, 2, 0, 1)
    return array


def torch_state_dict(params, dtype=None) -> dict[str, np.ndarray]:
    """A module's parameters as a PyTorch state dict (diffusers/transformers names and
    layouts: linear weights (out, in), convolutions OIHW), optionally cast to ``dtype``;
    arrays sharded over a mesh are gathered."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        a = _torch_layout(host_copy(leaf), str(getattr(path[-1], "key", path[-1])))
        out[path_key(path)] = a if dtype is None else a.astype(dtype)
    return out


def save_params(params, folder, stem: str, dtype=None) -> Path:
    """``folder/{stem}.safetensors``: one component's weights in PyTorch layout."""
    return write_safetensors(Path(folder) / f"{stem}.safetensors",
                             torch_state_dict(params, dtype), {"format": "pt"})


def save_unet(folder, config, params, dtype=None) -> Path:
    """A diffusers ``UNet2DConditionModel`` folder: ``config.json`` (from a ``UNetConfig``,
    or a config.json dict kept as it is) and ``diffusion_pytorch_model.safetensors``
    (``dtype``: None keeps the parameters' own)."""
    folder = Path(folder)
    if dataclasses.is_dataclass(config):
        config = unet_config(config)
    config = {"_class_name": "UNet2DConditionModel",
              **{k: v for k, v in config.items() if k != "_class_name"}}
    if is_writer():
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "config.json", json.dumps(config, indent=2, default=list) + "\n")
    save_params(params, folder, "diffusion_pytorch_model", dtype)
    return folder


def _write_json(path: Path, value: dict):
    if not is_writer():
        return
    write_json(path, value)


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def unet_config(config) -> dict:
    """A diffusers ``UNet2DConditionModel`` config.json dict (heads as
    ``attention_head_dim``, which diffusers reads as the head count)."""
    out = {"_class_name": "UNet2DConditionModel"}
    for f in dataclasses.fields(config):
        if f.name == "num_attention_heads":
            out["attention_head_dim"] = _plain(getattr(config, f.name))
        elif f.name != "only_cross_attention":
            out[f.name] = _plain(getattr(config, f.name))
    return out


def text_encoder_config(config) -> dict:
    out = {"architectures": [config.architecture], "model_type": "clip_text_model"}
    for f in dataclasses.fields(config):
        if f.name != "architecture" and not (f.name == "projection_dim"
                                             and getattr(config, f.name) is None):
            out[f.name] = getattr(config, f.name)
    return out


def scheduler_config(scheduler) -> dict:
    names = {cls: name for name, cls in SCHEDULER_CLASSES.items()}
    if type(scheduler) not in names:
        raise ValueError(f"cannot save a {type(scheduler).__name__} scheduler")
    out = {"_class_name": names[type(scheduler)]}
    out.update({k: _plain(v) for k, v in dataclasses.asdict(scheduler).items()})
    if out["_class_name"] == "PNDMScheduler":
        out.setdefault("skip_prk_steps", True)  # PLMS, unless the scheduler says otherwise
    return out


def save_pipeline(pipe, folder) -> Path:
    """Write ``pipe`` (SD or SDXL) as a diffusers pipeline folder; returns the folder.
    Weights are stored in their parameter dtype (float32, float16 or bfloat16; a pipeline
    on a mesh is gathered)."""
    from .. import __version__
    from .stable_diffusion import StableDiffusionXLPipeline

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and is not empty: save into a new folder")
    xl = isinstance(pipe, StableDiffusionXLPipeline)
    encoders = [("text_encoder", "tokenizer", pipe.text_encoder, pipe.tokenizer)]
    if xl:
        encoders.append(("text_encoder_2", "tokenizer_2", pipe.text_encoder_2,
                         pipe.tokenizer_2))
    index = {"_class_name": type(pipe).__name__, "_diffusers_version": "0.30.0",
             "_retom_jax_version": __version__,
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", scheduler_config(pipe.scheduler)["_class_name"]]}
    for te_name, tok_name, encoder, _ in encoders:
        index[te_name] = ["transformers", encoder.config.architecture]
        index[tok_name] = ["transformers", "CLIPTokenizer"]
    if pipe.default_guidance_scale != 7.5:  # (diffusers ignores "_" keys)
        index["_retom_jax_guidance_scale"] = pipe.default_guidance_scale
    if xl:
        index["force_zeros_for_empty_prompt"] = pipe.force_zeros_for_empty_prompt
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None],
                     requires_safety_checker=False)

    save_unet(folder / "unet", pipe.unet.config, pipe.unet.params)
    save_params(pipe.vae.params, folder / "vae", "diffusion_pytorch_model")
    vae = {"_class_name": "AutoencoderKL"}
    vae.update({k: _plain(v) for k, v in dataclasses.asdict(pipe.vae.config).items()})
    _write_json(folder / "vae" / "config.json", vae)
    for te_name, tok_name, encoder, tokenizer in encoders:
        save_params(encoder.params, folder / te_name, "model")
        _write_json(folder / te_name / "config.json", text_encoder_config(encoder.config))
        if is_writer():
            tokenizer.save_pretrained(str(folder / tok_name))
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(pipe.scheduler))
    _write_json(folder / "model_index.json", index)
    return folder
