"""Writing a pipeline as a diffusers folder (the layout ``load_pipeline`` and diffusers'
``from_pretrained`` read): ``model_index.json``, and per component its ``config.json`` (or
``scheduler_config.json``, tokenizer files) and safetensors weights in PyTorch layout.

``save_pipeline(load_pipeline("demo"), "demo-sd")`` turns the built-in demo model into a
folder that ``retom-jax generate --model demo-sd`` (and diffusers) load.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx

from .schedulers import _CLASSES as SCHEDULER_CLASSES
from .weights import torch_key

__all__ = ["save_pipeline"]


def _torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:  # (in, out) -> Linear (out, in)
        return array.T
    if leaf == "kernel" and array.ndim == 4:  # HWIO -> OIHW
        return array.transpose(3, 2, 0, 1)
    return array


def _save_params(params, folder: Path, stem: str):
    from safetensors.numpy import save_file

    tensors = {}
    for path, value in nnx.to_flat_state(params):
        leaf = str(path[-1])
        array = np.asarray(getattr(value, "value", value))
        if array.dtype.name == "bfloat16":  # safetensors' numpy writer has no bf16
            array = array.astype(np.float32)
        tensors[torch_key(path)] = np.ascontiguousarray(_torch_layout(array, leaf))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"{stem}.safetensors"))


def _write_json(path: Path, value: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


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
    Weights are stored in their parameter dtype (bfloat16 as float32)."""
    from . import __version__
    from .pipeline import StableDiffusionXLPipeline

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
    if xl:
        index["force_zeros_for_empty_prompt"] = pipe.force_zeros_for_empty_prompt
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None],
                     requires_safety_checker=False)

    _save_params(pipe.unet.params, folder / "unet", "diffusion_pytorch_model")
    _write_json(folder / "unet" / "config.json", unet_config(pipe.unet.config))
    _save_params(pipe.vae.params, folder / "vae", "diffusion_pytorch_model")
    vae = {"_class_name": "AutoencoderKL"}
    vae.update({k: _plain(v) for k, v in dataclasses.asdict(pipe.vae.config).items()})
    _write_json(folder / "vae" / "config.json", vae)
    for te_name, tok_name, encoder, tokenizer in encoders:
        _save_params(encoder.params, folder / te_name, "model")
        _write_json(folder / te_name / "config.json", text_encoder_config(encoder.config))
        tokenizer.save_pretrained(str(folder / tok_name))
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(pipe.scheduler))
    _write_json(folder / "model_index.json", index)
    return folder
