"""``load_pipeline``: a diffusers pipeline folder (or a cached repo id, or "demo") to a
pipeline object, the class chosen from ``model_index.json``.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from . import mesh as placement
from ..models import weights
from ..models.clip import load_text_encoder, load_tokenizer
from ..models.unet import load_unet
from ..models.vae import load_vae
from ..models.lora import parse_lora_spec
from ..models.weights import CheckpointError, alias_folder, cached_snapshot, read_json
from .base import Pipeline
from .flux import FluxPipeline, load_flux_pipeline
from .sd3 import StableDiffusion3Pipeline, load_sd3_pipeline
from .request import make_scheduler
from .stable_diffusion import StableDiffusionPipeline, StableDiffusionXLPipeline


PIPELINE_CLASSES = {
    "StableDiffusionPipeline": (StableDiffusionPipeline,
                                ("unet", "vae", "text_encoder", "tokenizer", "scheduler")),
    "StableDiffusionXLPipeline": (StableDiffusionXLPipeline,
                                  ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                   "tokenizer_2", "scheduler")),
}


def pipeline_folder(path_or_repo_id) -> Path:
    """A local folder holding ``model_index.json``: the path itself, or the snapshot of a
    repo id in the local Hugging Face cache ("demo": the built-in demo model). Never
    touches the network."""
    path = Path(os.path.expanduser(str(alias_folder(path_or_repo_id))))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} has no model_index.json: not a diffusers pipeline "
                                  f"folder")
        return path
    if path.exists():
        raise CheckpointError(f"{path} is not a folder: a diffusers pipeline is a folder "
                              f"holding model_index.json")
    root = cached_snapshot(path_or_repo_id, "local pipeline folder")
    return pipeline_folder(root)


def read_model_index(folder) -> dict:
    return read_json(folder, "model_index.json")


def _index_guidance(index: dict, root) -> float:
    g = index.get("_retom_jax_guidance_scale", Pipeline.default_guidance_scale)
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g < float("inf"):
        raise CheckpointError(f"{root}/model_index.json: _retom_jax_guidance_scale must be a "
                              f"positive number, got {g!r}")
    return float(g)


def default_guidance_scale(path_or_repo_id) -> float:
    """What ``guidance_scale=None`` means for a model, read from its ``model_index.json``
    alone (no weights): its ``_retom_jax_guidance_scale`` (diffusers ignores "_" keys; the
    demo's is 3), else diffusers' 7.5. The loaded pipeline's ``default_guidance_scale``."""
    root = pipeline_folder(path_or_repo_id)
    return _index_guidance(read_model_index(root), root)


def load_pipeline(path_or_repo_id, dtype=jnp.float32, *, scheduler=None, attention="auto",
                  param_dtype=None, variant: str | None = None, lora=(),
                  mesh=None):
    """Load a diffusers ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or
    ``FluxPipeline`` / ``StableDiffusion3Pipeline`` folder (``pipelines/flux.py``,
    ``pipelines/sd3.py``).

    ``path_or_repo_id``: a pipeline folder (with ``model_index.json``) or a repo id in the
    local Hugging Face cache. ``dtype``: compute dtype of every model (``param_dtype``, the
    stored weights' dtype, defaults to it; an SDXL-style VAE with ``force_upcast`` decodes
    in float32 when ``dtype`` is float16). ``scheduler``: None (the folder's scheduler),
    a name (``"ddim"``, ``"pndm"``, ``"euler"``, ``"euler_a"``, ``"dpm++2m"``,
    ``"dpm++2m_karras"``, built from the folder's scheduler config) or a scheduler object.
    ``variant="fp16"`` reads the ``.fp16`` weight files. ``lora``: LoRA files fused into
    the weights at load, each a path (scale 1), ``"file:0.7"`` or ``(path, scale)``.
    ``"demo"`` is the built-in demo model (a folder named demo is ``"./demo"``).
    ``mesh`` (``make_mesh(...)``): every parameter is read shard by shard onto the mesh
    and calls run sharded on it (see ``Pipeline.shard``).
    """
    if isinstance(lora, (str, os.PathLike)):
        lora = [lora]
    loras = [parse_lora_spec(spec) for spec in lora]  # bad entries fail before loading
    for file, _ in loras:
        if not Path(file).is_file():
            raise CheckpointError(f"LoRA file not found: {file}")
    dtype = weights.parse_dtype(dtype)
    root = pipeline_folder(path_or_repo_id)
    index = read_model_index(root)
    cls_name = index.get("_class_name")
    if cls_name in ("FluxPipeline", "StableDiffusion3Pipeline"):
        if loras and mesh is not None:
            raise ValueError(f"LoRA files with mesh= are not supported for a {cls_name} yet")
        if isinstance(scheduler, str):
            raise ValueError(f"a {cls_name} samples with its flow-matching scheduler "
                             f"(FlowMatchEuler); scheduler={scheduler!r} does not apply")
        load = load_flux_pipeline if cls_name == "FluxPipeline" else load_sd3_pipeline
        pipe = load(root, dtype, scheduler=scheduler, attention=attention,
                    param_dtype=param_dtype, variant=variant, mesh=mesh)
        for file, scale in loras:
            pipe.load_lora(file, scale)
        return pipe
    if cls_name not in PIPELINE_CLASSES:
        raise CheckpointError(
            f"{root}/model_index.json describes a {cls_name!r}; retom-jax loads "
            f"{', '.join(PIPELINE_CLASSES)}, FluxPipeline, StableDiffusion3Pipeline")
    cls, needed = PIPELINE_CLASSES[cls_name]
    for name in needed:
        entry = index.get(name)
        if name == "scheduler" and scheduler is not None and not isinstance(scheduler, str):
            continue
        if not entry or not isinstance(entry, (list, tuple)) or entry[0] is None:
            raise CheckpointError(f"{root}/model_index.json declares no {name}; a {cls_name} "
                                  f"needs {', '.join(needed)}")
        if not (root / name).is_dir():
            raise CheckpointError(f"the component folder {name}/ is missing in {root}")
    # The scheduler first: a bad name fails before any weights are read.
    sched_config = _read_scheduler_config(root) if (root / "scheduler").is_dir() else None
    try:
        sched = make_scheduler(sched_config, scheduler)
    except (ValueError, TypeError) as e:
        if sched_config is None or str(e).startswith("unknown scheduler"):
            raise
        raise CheckpointError(f"{root / 'scheduler' / 'scheduler_config.json'}: {e}") from None
    common = dict(param_dtype=param_dtype, variant=variant, attention=attention, mesh=mesh)
    unet = load_unet(root / "unet", dtype, subfolder=None, **common)
    vae = load_vae(root / "vae", dtype, subfolder=None, **common)
    te = load_text_encoder(root / "text_encoder", dtype, subfolder=None, **common)
    tok = load_tokenizer(root / "tokenizer", subfolder=None)
    if cls is StableDiffusionPipeline:
        pipe = StableDiffusionPipeline(unet, vae, te, tok, sched)
    else:
        te2 = load_text_encoder(root / "text_encoder_2", dtype, subfolder=None, **common)
        tok2 = load_tokenizer(root / "tokenizer_2", subfolder=None)
        pipe = StableDiffusionXLPipeline(unet, vae, te, te2, tok, tok2, sched,
                                         index.get("force_zeros_for_empty_prompt", True))
    pipe.scheduler_config = sched_config
    pipe.default_guidance_scale = _index_guidance(index, root)
    for file, scale in loras:
        pipe.load_lora(file, scale)
    if mesh is not None:
        pipe.mesh = mesh
        if loras:  # the fused weights placed by the rules again
            placement.shard_pipeline(pipe, mesh)
    return pipe


def _read_scheduler_config(root: Path) -> dict:
    return read_json(root / "scheduler", "scheduler_config.json")
