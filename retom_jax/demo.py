"""A tiny Stable Diffusion pipeline with random weights, built in memory.

It has the structure of an SD 1.x pipeline (CLIP text encoder, UNet with cross-attention,
VAE decoder, a PNDM/PLMS scheduler configured as SD 1.5's) at a size that compiles and
runs in seconds on a CPU. Its weights are random: **its images are noise**. It exists to
check that the whole path (tokenizer, text encoder, compiled sampling loop with token
merging, decoder, image file) works without downloading anything; ``retom-jax generate
--model demo`` uses it.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax.numpy as jnp

from .clip import TextEncoder, TextEncoderConfig, build_text_encoder, quiet_transformers
from .pipeline import StableDiffusionPipeline
from .schedulers import from_config as scheduler_from_config
from .unet import UNet, UNet2DConditionModel, UNetConfig
from .vae import VAE, AutoencoderKL, VAEConfig
from .weights import parse_dtype, random_params

__all__ = ["DEMO_NOTICE", "bpe_vocab", "build_demo_pipeline", "demo_tokenizer", "DEMO_UNET", "DEMO_VAE",
           "DEMO_SCHEDULER"]

DEMO_NOTICE = ("demo model: a tiny pipeline with random weights, built in memory. Its images "
               "are noise; it only shows that the whole pipeline runs. Pass a real Stable "
               "Diffusion folder (or a cached repo id) with --model for real images.")

# Two UNet levels, attention at the full latent resolution (where merging applies).
DEMO_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
# Four VAE levels: a scale factor of 8 as in Stable Diffusion (16x16 latents -> 128 px).
DEMO_VAE = VAEConfig(
    block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
    norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=128,
)
DEMO_SCHEDULER = {  # Stable Diffusion 1.5's scheduler config
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}

_SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789!,.'-"
_WORDS = ("a", "photo", "of", "the", "cat", "dog", "painting", "in", "and", "with")


def bpe_vocab(words, symbols: str = _SYMBOLS, extra=()):
    """``(vocab, merges)`` of a small CLIP byte-pair vocabulary: each symbol (word-inner
    and word-final), each of ``words`` merged left to right into one token, the ``extra``
    tokens, then ``<|startoftext|>`` and ``<|endoftext|>`` last."""
    vocab = {}
    for c in symbols:
        vocab[c] = len(vocab)
    for c in symbols:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in words:
        if len(word) == 1:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            pair = f"{cur} {nxt}"
            if pair not in merges:
                merges.append(pair)
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    for token in (*extra, "<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def demo_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer over the small demo vocabulary (unknown characters become
    ``<|endoftext|>``, as in CLIP). Its files are written to a temporary folder, read,
    and the folder is removed."""
    CLIPTokenizer = quiet_transformers().CLIPTokenizer
    vocab, merges = bpe_vocab(_WORDS)
    with tempfile.TemporaryDirectory(prefix="retom-jax-demo-") as tmp:
        tmp = Path(tmp)
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"),
                             model_max_length=model_max_length)


def build_demo_pipeline(dtype=jnp.float32, seed: int = 0, scheduler=None,
                        attention: str = "auto") -> StableDiffusionPipeline:
    """The demo pipeline (random weights drawn from ``seed``). ``scheduler``: None (PLMS
    as in SD 1.5), a scheduler name (``"ddim"``, ``"dpm++2m"`` ...) or a scheduler."""
    dtype = parse_dtype(dtype)
    vocab, _ = bpe_vocab(_WORDS)
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    text_config = TextEncoderConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, eos_token_id=eos, bos_token_id=bos,
        pad_token_id=eos)
    graphdef, params = random_params(lambda rngs: build_text_encoder(
        text_config, dtype=dtype, attention=attention, rngs=rngs), dtype, seed)
    text_encoder = TextEncoder(text_config, graphdef, params, dtype=dtype, param_dtype=dtype)

    unet_config = UNetConfig.from_dict(DEMO_UNET)
    graphdef, params = random_params(lambda rngs: UNet2DConditionModel(
        unet_config, attention=attention, dtype=dtype, param_dtype=dtype, rngs=rngs),
        dtype, seed + 1)
    unet = UNet(unet_config, graphdef, params, dtype, attention)

    graphdef, params = random_params(lambda rngs: AutoencoderKL(
        DEMO_VAE, dtype=dtype, param_dtype=dtype, attention=attention, rngs=rngs), dtype, seed + 2)
    vae = VAE(DEMO_VAE, graphdef, params, dtype=dtype, param_dtype=dtype)

    if scheduler is None or isinstance(scheduler, str):
        scheduler = scheduler_from_config(DEMO_SCHEDULER, name=scheduler)
    return StableDiffusionPipeline(unet, vae, text_encoder, demo_tokenizer(), scheduler)
