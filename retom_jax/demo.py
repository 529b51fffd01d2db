"""The demo model behind ``--model demo``: a tiny Stable Diffusion pipeline trained by this
package on its own synthetic data set (``retom_jax.shapes``: one coloured shape on a plain
coloured background, captioned "a red circle on a blue background").

It has the structure of an SD 1.x pipeline (CLIP text encoder, UNet with cross-attention,
AutoencoderKL, a PNDM/PLMS scheduler configured as SD 1.5's) at a size that trains on a
2-core CPU in well under an hour and samples in seconds: 64x64 images, 16x16x4 latents.
Its weights ship inside the package (``retom_jax/assets/demo/``, a diffusers pipeline
folder); ``retom-jax train --demo`` (``retom_jax.demo_train``) reproduces them. It knows
six colours (red, green, blue, yellow, white, black) and three shapes (circle, square,
triangle); other words mean nothing to it.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax.numpy as jnp

from . import shapes
from .models.vae import VAEConfig
from .models.weights import DEMO_ASSETS, parse_dtype
from .pipelines import load_pipeline

__all__ = ["DEMO_NOTICE", "DEMO_ASSETS", "bpe_vocab", "build_demo_pipeline", "demo_tokenizer",
           "DEMO_UNET", "DEMO_VAE", "DEMO_TEXT", "DEMO_SCHEDULER", "SD15_SCHEDULER",
           "DEMO_WORDS", "DEMO_PROMPTS", "DEMO_GUIDANCE"]

DEMO_NOTICE = ("demo model: a tiny pipeline trained by retom-jax on its own synthetic shapes "
               "(64x64 images of one coloured shape on a coloured background). Prompts like "
               "'a red circle on a blue background' work; colours: "
               + ", ".join(shapes.COLORS) + "; shapes: " + ", ".join(shapes.SHAPES)
               + ". Pass a real Stable Diffusion folder (or a cached repo id) with --model "
               "for real images.")
DEMO_PROMPTS = ("a red circle on a blue background", "a yellow square on a black background",
                "a white triangle on a green background", "a blue circle on a yellow background")

# Two UNet levels, attention at the full latent resolution (where merging applies).
DEMO_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
# Three VAE levels: a scale factor of 4 (64 px images <-> 16x16 latents).
DEMO_VAE = VAEConfig(
    block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
    # 4+ channels per group: a flat colour's features survive the group normalisation
    norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64,
)
# A small CLIP text encoder (trained briefly to tell the caption's colours and shape apart,
# then frozen while the rest trains: demo_train.train_text_encoder).
DEMO_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77)
SD15_SCHEDULER = {  # Stable Diffusion 1.5's scheduler config
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}
# The demo's: SD 1.5's with v-prediction (as SD 2.x; see demo_train.py for why).
DEMO_SCHEDULER = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}
# Its default guidance scale (``guidance_scale=None``, the CLI's default): at SD's 7.5 the
# extrapolation pushes its flat colours past the palette (a red square comes out yellow,
# a green background black): all 90 captions x 2 seeds right at 2 and 3, 165/180 at 5,
# 127/180 at 7.5 (``python benchmarks/demo_quality.py --guidance G --seeds 0 1``).
DEMO_GUIDANCE = 3.0

_SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789!,.'-"
PROMPT_WORDS = ("a", "photo", "of", "the", "cat", "dog", "painting", "in", "and", "with")
# The demo model's vocabulary (the caption words; BPE keeps most of them whole).
DEMO_WORDS = tuple(dict.fromkeys(PROMPT_WORDS + shapes.WORDS))


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


def demo_tokenizer(model_max_length: int = 77, words=PROMPT_WORDS):
    """A CLIP tokenizer over a small vocabulary (``words`` merged to single tokens;
    unknown characters become ``<|endoftext|>``, as in CLIP). Its files are written to a
    temporary folder, read, and the folder is removed."""
    from .models.clip import quiet_transformers

    CLIPTokenizer = quiet_transformers().CLIPTokenizer
    vocab, merges = bpe_vocab(words)
    with tempfile.TemporaryDirectory(prefix="retom-jax-demo-") as tmp:
        tmp = Path(tmp)
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"),
                             model_max_length=model_max_length)


def build_demo_pipeline(dtype=jnp.float32, seed: int = 0, scheduler=None,
                        attention: str = "auto", path=None):
    """The trained demo pipeline: ``load_pipeline("demo", ...)`` (or ``path``, e.g. a folder
    written by ``retom-jax train --demo``). ``scheduler``: None (PLMS as in SD 1.5), a name
    (``"ddim"``, ``"dpm++2m"`` ...) or a scheduler. ``seed`` is accepted for compatibility
    and unused (the weights are trained, not drawn)."""
    return load_pipeline("demo" if path is None else Path(path), parse_dtype(dtype),
                         scheduler=scheduler, attention=attention)
