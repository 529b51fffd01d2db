"""Stable Diffusion 3 / 3.5 text-to-image, as diffusers' ``StableDiffusion3Pipeline``, with
token merging. Shares the sampling machinery of `FluxPipeline` (one jitted program for the
loop and the decoder, ``compile()``, ``progress=True``).

Conditioning as diffusers: the penultimate hidden states of the two CLIP encoders
(concatenated along channels, zero-padded to the T5 width) followed by the T5 tokens
(``max_sequence_length``, 256 by default); the pooled embedding is both CLIPs' projected
outputs side by side. Classifier-free guidance runs the batch ``[negative, positive]``
(negative prompt "" by default); ``guidance_scale <= 1`` turns it off. Sampling is
`FlowMatchEuler` (SD3: shift 3.0) over NCHW latents carried in float32. Image-to-image
(``image=``, ``strength=``) as diffusers' ``StableDiffusion3Img2ImgPipeline`` and LoRA
(``load_lora``, diffusers/peft layout) come from `FluxPipeline`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..merge import MergeMethod
from ..models import weights
from ..models.clip import load_text_encoder, load_tokenizer, tokenize
from ..models.sd3 import load_sd3_transformer
from ..models.t5 import load_t5_encoder, load_t5_tokenizer
from ..models.vae import load_vae
from ..schedulers.flow_match import FlowMatchEuler
from .flux import OUTPUT_TYPES, FluxPipeline, FluxSampleConfig
from .request import seed_key

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SD3SampleConfig(FluxSampleConfig):
    guidance: bool = True


class StableDiffusion3Pipeline(FluxPipeline):
    """SD3 / SD3.5: ``transformer`` (`SD3Transformer`), ``vae``, ``text_encoder`` /
    ``text_encoder_2`` (CLIP with projection) + tokenizers, ``text_encoder_3`` (T5) +
    ``tokenizer_3``, ``scheduler``."""

    default_guidance_scale = 7.0
    max_sequence_length = 256

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, scheduler: FlowMatchEuler):
        super().__init__(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                         scheduler)
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3

    @property
    def default_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def _encode(self, params, ids1, ids2, ids3):
        o1 = self.text_encoder.apply(params["clip"], ids1)
        o2 = self.text_encoder_2.apply(params["clip2"], ids2)
        t5 = self.text_encoder_3.apply(params["t5"], ids3)
        clip = jnp.concatenate([o1.hidden_states[-2], o2.hidden_states[-2]], axis=-1)
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        pooled = jnp.concatenate([o1.text_embeds, o2.text_embeds], axis=-1)
        return jnp.concatenate([clip, t5.astype(clip.dtype)], axis=1), pooled

    def encode_prompt(self, prompt, num_images_per_prompt: int = 1,
                      max_sequence_length: int = 256):
        """``(prompt_embeds [B, 77 + T, joint_dim], pooled [B, pooled_dim])``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, "
                             f"got {prompt!r}")
        ids3 = self.tokenizer_3(prompts, padding="max_length", max_length=max_sequence_length,
                                truncation=True, return_tensors="np").input_ids
        embeds, pooled = self._encode_jit(
            {"clip": self.text_encoder.params, "clip2": self.text_encoder_2.params,
             "t5": self.text_encoder_3.params},
            jnp.asarray(tokenize(self.tokenizer, prompts), jnp.int32),
            jnp.asarray(tokenize(self.tokenizer_2, prompts), jnp.int32),
            jnp.asarray(ids3, jnp.int32))
        rep = lambda a: jnp.repeat(a, num_images_per_prompt, axis=0)  # noqa: E731
        return rep(embeds), rep(pooled)

    def _step(self, static, params, cond, i, carry, key):
        x, state, merge_state = carry
        tr = self.transformer
        x_in = jnp.concatenate([x, x]) if static.guidance else x
        timestep = jnp.broadcast_to(state.timesteps[i], (x_in.shape[0],))
        step_key = None if key is None else jax.random.fold_in(key, i)
        out = tr.apply(params["transformer"], x_in.astype(tr.dtype), cond["embeds"],
                       cond["pooled"], timestep, merge=static.merge, merge_state=merge_state,
                       key=step_key)
        pred = out.sample.astype(_F32)
        if static.guidance:
            uncond, text = jnp.split(pred, 2)
            pred = uncond + cond["guidance_scale"] * (text - uncond)
        x, state = self.scheduler.step(state, pred, i, x)
        return x.astype(_F32), state, out.merge_state

    @property
    def _image_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size

    def _to_carry(self, z):
        return z  # SD3 carries NCHW latents

    def _from_carry(self, x, static):
        return x

    def _prepare(self, prompt, num_inference_steps, guidance_scale, height, width,
                 num_images_per_prompt, seed, key, latents, max_sequence_length, merge,
                 output_type, mu, negative_prompt=None, image=None, strength=None,
                 true_cfg_scale=None):
        """As `FluxPipeline`'s, with classifier-free guidance and ``negative_prompt``."""
        if true_cfg_scale is not None:
            raise ValueError("true_cfg_scale is Flux's; SD3 guides with guidance_scale and "
                             "negative_prompt")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got "
                             f"{num_inference_steps!r}")
        if merge is not None and (not isinstance(merge, MergeMethod) or len(merge.stages()) > 1):
            raise ValueError(f"merge must be one ToMe, ReToM or ToDo configuration (no window "
                             f"schedule), got {merge!r}")
        f, p = self.vae_scale_factor, self.transformer.config.patch_size
        image, strength, height, width = self._check_image(image, strength, height, width,
                                                           latents, prompt)
        height, width = height or self.default_size, width or self.default_size
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < f * p or v % (f * p):
                raise ValueError(f"{name} must be a positive multiple of {f * p} (the VAE "
                                 f"factor x the patch size), got {v!r}")
        g = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        cfg = g > 1.0
        embeds, pooled = self.encode_prompt(prompt, num_images_per_prompt, max_sequence_length)
        b = embeds.shape[0]
        if cfg:
            negatives = negative_prompt or ""
            n_prompts = b // num_images_per_prompt
            negatives = [negatives] * n_prompts if isinstance(negatives, str) else negatives
            if len(negatives) != n_prompts:
                raise ValueError(f"negative_prompt has {len(negatives)} entries for "
                                 f"{n_prompts} prompts")
            neg, neg_pooled = self.encode_prompt(negatives, num_images_per_prompt,
                                                 max_sequence_length)
            embeds, pooled = jnp.concatenate([neg, embeds]), jnp.concatenate([neg_pooled, pooled])
        elif negative_prompt is not None:
            raise ValueError("negative_prompt needs guidance_scale above 1")
        shape = (b, self.latent_channels, height // f, width // f)
        if key is not None and seed is not None:
            raise ValueError("pass either seed or key, not both")
        key = key if key is not None else seed_key(0 if seed is None else seed)
        k_noise, k_loop = jax.random.split(key)
        if latents is None and image is None:
            latents = jax.random.normal(k_noise, shape, _F32)
        elif latents is not None:
            latents = jnp.asarray(latents, _F32)
            if latents.shape != shape:
                raise ValueError(f"latents must be NCHW {list(shape)} for {height}x{width} "
                                 f"images, got {list(latents.shape)}")
        sched = self.scheduler
        n_tokens = (shape[2] // p) * (shape[3] // p)
        if sched.use_dynamic_shifting and mu is None:
            mu = sched.mu(n_tokens)
        state = sched.set_timesteps(num_inference_steps, mu=mu)
        start = 0
        if image is not None:
            start, latents, k_loop = self._start_latents(image, strength, num_inference_steps,
                                                         b, state, key)
        cond = {"embeds": embeds, "pooled": pooled, "guidance_scale": jnp.asarray(g, _F32)}
        grid = (shape[2] // p, shape[3] // p)
        static = SD3SampleConfig(num_inference_steps, b, grid, embeds.shape[1], merge,
                                 output_type != "latent", start, guidance=cfg)
        merge_state = None
        if merge is not None:
            self.transformer.check_merge(merge, grid, key=k_loop)
            if merge.carries_cache:
                merge_state = self.transformer.init_merge_state(
                    (embeds.shape[0], *shape[1:]), embeds.shape, merge)
        needs_key = merge is not None and getattr(merge, "use_rand", False)
        return static, (cond, latents, state, merge_state, k_loop if needs_key else None)


def load_sd3_pipeline(root, dtype=jnp.float32, *, scheduler=None, attention="auto",
                      param_dtype=None, variant=None, mesh=None) -> StableDiffusion3Pipeline:
    """A diffusers ``StableDiffusion3Pipeline`` folder (what `load_pipeline` calls)."""
    root = Path(root)
    index = weights.read_json(root, "model_index.json")
    needed = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
              "tokenizer_2", "text_encoder_3", "tokenizer_3", "scheduler")
    for name in needed:
        if not index.get(name) or index[name][0] is None or not (root / name).is_dir():
            raise weights.CheckpointError(f"{root} has no {name}/ component; a "
                                          f"StableDiffusion3Pipeline needs {', '.join(needed)}")
    if scheduler is None:
        scheduler = FlowMatchEuler.from_config(
            weights.read_json(root / "scheduler", "scheduler_config.json"))
    elif not isinstance(scheduler, FlowMatchEuler):
        raise ValueError(f"SD3 samples with FlowMatchEuler, got {scheduler!r}")
    kw = dict(param_dtype=param_dtype, variant=variant, mesh=mesh)
    te = [load_text_encoder(root / n, dtype, subfolder=None, attention=attention, **kw)
          for n in ("text_encoder", "text_encoder_2")]
    pipe = StableDiffusion3Pipeline(
        load_sd3_transformer(root / "transformer", dtype, subfolder=None, attention=attention,
                             **kw),
        load_vae(root / "vae", dtype, subfolder=None, attention=attention, **kw),
        te[0], load_tokenizer(root / "tokenizer", subfolder=None),
        te[1], load_tokenizer(root / "tokenizer_2", subfolder=None),
        load_t5_encoder(root / "text_encoder_3", dtype, subfolder=None, **kw),
        load_t5_tokenizer(root / "tokenizer_3", subfolder=None), scheduler)
    pipe.mesh, pipe.folder = mesh, root
    return pipe
