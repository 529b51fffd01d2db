"""Text-to-image pipelines with token merging: Stable Diffusion 1.x/2.x, SDXL, Flux.1
(:mod:`.flux`) and SD3/3.5 (:mod:`.sd3`).

:mod:`.request` (what selects a compiled program, the call's request and output),
:mod:`.base` (the sampling machinery every pipeline shares), :mod:`.stable_diffusion`
(the text conditioning of SD and SDXL), :mod:`.loading` (``load_pipeline``), :mod:`.options`
(diffusers' call options: img2img, guidance rescale, eta, clip skip, SDXL conditioning),
:mod:`.mesh` (a pipeline on a device mesh), :mod:`.memory` (the fit check before a program
runs), :mod:`.save` (writing diffusers folders).
"""
from .base import Pipeline
from .flux import FluxPipeline, load_flux_pipeline
from .sd3 import StableDiffusion3Pipeline, load_sd3_pipeline
from .loading import (PIPELINE_CLASSES, default_guidance_scale, load_pipeline,
                      pipeline_folder, read_model_index)
from .request import OUTPUT_TYPES, SEED_LIMIT, PipelineOutput, SampleConfig, seed_key
from .save import save_pipeline, save_unet
from .step_cache import StepCache
from .stable_diffusion import StableDiffusionPipeline, StableDiffusionXLPipeline

__all__ = ["Pipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "FluxPipeline",
           "load_flux_pipeline", "StableDiffusion3Pipeline", "load_sd3_pipeline",
           "PipelineOutput", "SampleConfig", "OUTPUT_TYPES", "SEED_LIMIT", "seed_key",
           "PIPELINE_CLASSES", "load_pipeline", "pipeline_folder", "read_model_index",
           "default_guidance_scale", "save_pipeline", "save_unet", "StepCache"]
