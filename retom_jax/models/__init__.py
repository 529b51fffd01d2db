"""The networks, as flax.nnx modules with a pure ``apply`` underneath, and the readers of
the checkpoint folders they come from (diffusers/transformers layouts, safetensors, no
torch): the UNet, the CLIP text encoders, the VAE, LoRA files, and the attention kernels
they share; the diffusion transformers of Flux.1 (:mod:`.flux`) and SD3/3.5 (:mod:`.sd3`)
and the T5 encoder (:mod:`.t5`)."""
from .attention import dot_product_attention
from .flux import FluxConfig, FluxTransformer, load_flux_transformer
from .sd3 import SD3Config, SD3Transformer, load_sd3_transformer
from .t5 import T5Config, T5Encoder, load_t5_encoder, load_t5_tokenizer
from .clip import (TextEncoder, TextEncoderConfig, TextEncoderOutput, load_text_encoder,
                   load_tokenizer, tokenize)
from .lora import LoraError, read_lora
from .unet import UNet, UNetConfig, UNetOutput, init_unet, load_unet
from .vae import VAE, DiagonalGaussian, VAEConfig, load_vae
from .weights import DEMO_ASSETS, CheckpointError

__all__ = ["dot_product_attention", "TextEncoder", "TextEncoderConfig", "TextEncoderOutput",
           "load_text_encoder", "load_tokenizer", "tokenize", "LoraError", "read_lora", "UNet",
           "UNetConfig", "UNetOutput", "init_unet", "load_unet", "VAE", "DiagonalGaussian",
           "VAEConfig", "load_vae", "CheckpointError", "DEMO_ASSETS", "FluxConfig",
           "FluxTransformer", "load_flux_transformer", "SD3Config", "SD3Transformer",
           "load_sd3_transformer", "T5Config", "T5Encoder", "load_t5_encoder", "load_t5_tokenizer"]
