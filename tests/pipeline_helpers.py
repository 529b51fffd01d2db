"""Tiny diffusers pipelines (SD and SDXL) saved to folders, for the pipeline and CLI tests.

Every model is random and perturbed away from its initialisation (token embeddings of
unit scale, noise on every weight) so that the text really steers the UNet and a wrongly
wired component shows up in the images.
"""
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from retom_jax.demo import bpe_vocab
from tests.tiny import FAMILIES, SDXL_TEXT_EMBEDS, torch_unet

MAX_LENGTH = 16
WORDS = ["the", "cat", "dog", "a", "photo", "of", "painting", "blurry", "red", "car"]

# Stable Diffusion 1.5's scheduler settings (its DDIM form).
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def vocab_and_merges():
    """A CLIP byte-pair vocabulary: letters (word-inner and word-final), the WORDS merged
    into single tokens, "!" (SDXL's second tokenizer pads with it), then BOS and EOS."""
    return bpe_vocab(WORDS, "abcdefghijklmnopqrstuvwxyz", extra=("!", "!</w>"))


def make_tokenizer(**kwargs) -> CLIPTokenizer:
    vocab, merges = vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab=str(folder / "vocab.json"),
                             merges=str(folder / "merges.txt"), model_max_length=MAX_LENGTH,
                             **kwargs)


def perturb(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def text_encoder(hidden, seed, projection_dim=None):
    vocab, _ = vocab_and_merges()
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden + 5,
        # 4 layers (5 hidden states): with 3, clip_skip's index -(c + 2) and a wrong
        # -(c - 2) would pick the same hidden state for every c (they differ by 4)
        num_hidden_layers=4, num_attention_heads=2, max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu" if projection_dim else "quick_gelu",
        eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], projection_dim=projection_dim or 512)
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    model = perturb(cls(config).eval())
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


def vae(seed, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, **extra).eval())


def save_sd(folder: Path):
    """A tiny StableDiffusionPipeline (DDIM as SD 1.5 configures it) saved in ``folder``;
    returns the torch pipeline. Images: 32x32 by default (VAE scale factor 2)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae(1), text_encoder=text_encoder(FAMILIES["sd1"]["cross_attention_dim"], 2),
        tokenizer=make_tokenizer(), unet=torch_unet(FAMILIES["sd1"], seed=3),
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def save_sdxl(folder: Path):
    """A tiny StableDiffusionXLPipeline (Euler, SDXL's scheduler) saved in ``folder``: two
    text encoders of different widths (12 + 20 = the UNet's 32), the second projected to
    SDXL_TEXT_EMBEDS features and padded with "!", a VAE with latents_mean/std."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=vae(4, latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.8, 1.2, 1.0)),
        text_encoder=text_encoder(12, 5),
        text_encoder_2=text_encoder(20, 6, projection_dim=SDXL_TEXT_EMBEDS),
        tokenizer=make_tokenizer(),
        tokenizer_2=make_tokenizer(pad_token="!"),
        unet=torch_unet(FAMILIES["sdxl"], seed=7),
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items()
                                            if k not in ("clip_sample", "set_alpha_to_one")},
                                         timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def saved_pipeline(tmp_path_factory, name: str, save):
    """``(torch pipeline, our pipeline, folder)``: a tiny pipeline written by ``save``
    (``save_sd`` / ``save_sd2`` / ``save_sdxl``) and loaded back with ``load_pipeline``."""
    from retom_jax.pipelines.loading import load_pipeline

    folder = tmp_path_factory.mktemp(name)
    torch_pipe = save(folder)
    return torch_pipe, load_pipeline(folder), folder


# Module-scoped fixtures of the pipeline test modules (import them there by name): one
# saved and loaded pipeline per module and family, shared by that module's tests.
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return saved_pipeline(tmp_path_factory, "sd", save_sd)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return saved_pipeline(tmp_path_factory, "sd2", save_sd2)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return saved_pipeline(tmp_path_factory, "sdxl", save_sdxl)


def latents_for(batch, h, w, seed=0):
    """Unit Gaussian NCHW latents for ``batch`` images of ``h x w`` pixels (factor 2)."""
    return np.random.RandomState(seed).randn(batch, 4, h // 2, w // 2).astype(np.float32)


def reference(pipe, prompt, latents, **kwargs):
    """The torch pipeline's output from the given NCHW latents (output_type "np" unless
    given)."""
    kwargs.setdefault("output_type", "np")
    with torch.no_grad():
        out = pipe(prompt, latents=torch.from_numpy(latents), **kwargs).images
    return out.numpy() if hasattr(out, "numpy") else np.asarray(out)


def save_sd2(folder: Path):
    """A tiny SD 2.x-style pipeline (three UNet levels, linear projections, upcast
    attention, per-level heads) with a v-prediction DDIM scheduler, saved in ``folder``;
    returns the torch pipeline. Images: multiples of 8 pixels."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae(8), text_encoder=text_encoder(FAMILIES["sd2"]["cross_attention_dim"], 9),
        tokenizer=make_tokenizer(), unet=torch_unet(FAMILIES["sd2"], seed=10),
        scheduler=DDIMScheduler(**SD_SCHEDULER, prediction_type="v_prediction"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def with_torch_scheduler(torch_pipe, folder, cls, **extra):
    """The torch pipeline with its scheduler switched as a diffusers user does it:
    ``cls.from_config`` of the config saved in ``folder`` (options carry over)."""
    from diffusers import DDIMScheduler

    saved = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    new = type(torch_pipe)(**{**torch_pipe.components,
                              "scheduler": cls.from_config(saved.config, **extra)},
                           requires_safety_checker=False)
    new.set_progress_bar_config(disable=True)
    return new


def step_keys(key, i):
    """``(scheduler key, merge key)`` of denoising step ``i`` in our pipeline's loop: the
    loop key folded with the step index, then split."""
    import jax

    return jax.random.split(jax.random.fold_in(key, i))


def feed_ancestral_noise(monkeypatch, key, shape):
    """diffusers' Euler ancestral scheduler draws the noise our pipeline draws: step ``i``
    gets ``normal(step_keys(key, i)[0], shape)``. Returns the list of steps drawn."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as module
    import jax

    steps = []

    def randn_tensor(size, *args, **kwargs):
        assert tuple(size) == tuple(shape), (size, shape)
        z = jax.random.normal(step_keys(key, len(steps))[0], shape, np.float32)
        steps.append(len(steps))
        return torch.from_numpy(np.array(z))

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    return steps
