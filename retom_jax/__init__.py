"""retom-jax: diffusion models in JAX/Flax with token merging (ToMe, ReToM, ToDo).

Loaders read diffusers/transformers checkpoint folders (or the local Hugging Face cache)
without torch; every model is an NNX module with a pure ``apply`` underneath. Subpackages:
``models``, ``merge``, ``schedulers``, ``pipelines``, ``train``, ``eval``, ``cli``.
"""
# ----------------------------------------------------------------------------- pipelines
from .pipelines import (FluxPipeline, PipelineOutput, StableDiffusion3Pipeline,
                        StableDiffusionPipeline, StableDiffusionXLPipeline, StepCache,
                        load_pipeline, save_pipeline)
# ----------------------------------------------------------------------------- merging
from .merge import METHODS, BlockMerge, MergeMethod, ReToM, ToDo, ToMe, from_options, loop_segments
# ----------------------------------------------------------------------------- models
from .models import (FluxTransformer, SD3Transformer, T5Encoder, load_flux_transformer,
                     load_sd3_transformer, load_t5_encoder)
from .models import (VAE, CheckpointError, DiagonalGaussian, LoraError, TextEncoder,
                     TextEncoderConfig, TextEncoderOutput, UNet, UNetConfig, UNetOutput,
                     VAEConfig, dot_product_attention, init_unet, load_text_encoder,
                     load_tokenizer, load_unet, load_vae, read_lora, tokenize)
# ----------------------------------------------------------------------------- schedulers
from .schedulers import (DDIM, PNDM, DPMSolverMultistep, Euler, EulerAncestral, FlowMatchEuler,
                         load_scheduler)
from .schedulers import from_config as scheduler_from_config
# ----------------------------------------------------------------------------- scaling
from .sharding import initialize_distributed, make_mesh

__version__ = "0.1.0"

__all__ = [
    # pipelines
    "load_pipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "PipelineOutput",
    "save_pipeline", "FluxPipeline", "StableDiffusion3Pipeline", "StepCache",
    # merging
    "ToMe", "ReToM", "ToDo", "METHODS", "from_options", "MergeMethod", "BlockMerge",
    "loop_segments",
    # models
    "UNet", "UNetConfig", "UNetOutput", "init_unet", "load_unet", "VAE", "VAEConfig",
    "DiagonalGaussian", "load_vae", "TextEncoder", "TextEncoderConfig", "TextEncoderOutput",
    "load_text_encoder", "load_tokenizer", "tokenize", "dot_product_attention", "read_lora",
    "LoraError", "CheckpointError", "FluxTransformer", "load_flux_transformer",
    "SD3Transformer", "load_sd3_transformer", "T5Encoder", "load_t5_encoder",
    # schedulers
    "DDIM", "PNDM", "Euler", "EulerAncestral", "DPMSolverMultistep", "FlowMatchEuler", "load_scheduler",
    "scheduler_from_config",
    # scaling
    "make_mesh", "initialize_distributed",
]
