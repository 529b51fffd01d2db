"""retom-jax: Stable Diffusion in JAX/Flax with token merging (ToMe, ReToM, ToDo).

Loaders read diffusers/transformers checkpoint folders (or the local Hugging Face cache)
without torch; every model is an NNX module with a pure ``apply`` underneath.
"""
from .attention import dot_product_attention
from .clip import (TextEncoder, TextEncoderConfig, TextEncoderOutput, load_text_encoder,
                   load_tokenizer, tokenize)
from .lora import LoraError, read_lora
from .merge import BlockMerge, MergeMethod, ReToM, ToDo, ToMe, loop_segments
from .pipeline import (PipelineOutput, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       load_pipeline)
from .save import save_pipeline
from .sharding import initialize_distributed, make_mesh
from .schedulers import (DDIM, PNDM, DPMSolverMultistep, Euler, EulerAncestral,
                         load_scheduler)
from .schedulers import from_config as scheduler_from_config
from .unet import UNet, UNetConfig, UNetOutput, init_unet, load_unet
from .vae import VAE, DiagonalGaussian, VAEConfig, load_vae
from .weights import CheckpointError

__version__ = "0.1.0"
