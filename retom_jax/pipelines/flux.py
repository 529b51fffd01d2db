"""Flux.1 text-to-image (dev and schnell), as diffusers' ``FluxPipeline``, with token merging.

``load_pipeline(folder)`` returns a `FluxPipeline` when ``model_index.json`` names
``FluxPipeline``: CLIP (pooled prompt embedding), T5 (the per-token text), the Flux
transformer, the 16-channel VAE and ``FlowMatchEuler`` with Flux's resolution-dependent
shift. ::

    pipe = rj.load_pipeline("FLUX.1-dev", jnp.bfloat16)
    out = pipe("a red cube", height=1024, width=1024, num_inference_steps=28, seed=0,
               merge=rj.ReToM(ratio=0.5, merge_mlp=True))

How a call runs (as the SD pipelines): arguments checked in Python; prompts tokenized on
the host and encoded by one jitted function; one jitted program runs the whole denoising
loop (``lax.fori_loop``; the latents are packed 2x2 patches ``[B, h * w / 4, 64]``, carried
in float32) and the VAE decode. Its static configuration (`FluxConfig`) selects the
compiled program; prompts, seeds, latents and the guidance scale are arguments.
``progress=True`` runs the same step function from a Python loop with a progress line.
Guidance is the distilled guidance of dev (an input of the transformer, no second
batch); schnell has none. diffusers' "true CFG" (``true_cfg_scale`` > 1 with a
``negative_prompt``) runs the positive and negative rows as one doubled batch.
``image=`` / ``strength=`` run image-to-image as diffusers' ``FluxImg2ImgPipeline`` (the
loop starts into the schedule: `FluxSampleConfig.start`); ``load_lora`` fuses LoRA files
(peft or kohya layout) into the transformer. See docs/transformers.md.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..merge import MergeMethod
from ..models import weights
from ..models.clip import load_text_encoder, load_tokenizer, tokenize
from ..models.flux import image_ids, load_flux_transformer
from ..models.t5 import load_t5_encoder, load_t5_tokenizer
from ..models.vae import load_vae
from ..progress import Progress
from ..schedulers.flow_match import FlowMatchEuler
from . import options as features
from .request import PipelineOutput, seed_key

_F32 = jnp.float32
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclasses.dataclass(frozen=True)
class FluxSampleConfig:
    """What selects a compiled sampling program."""
    steps: int
    batch: int
    grid: tuple  # packed latent (rows, cols): latent size / 2
    text_tokens: int
    merge: MergeMethod | None
    decode: bool
    start: int = 0  # image-to-image: the schedule index the loop starts at
    true_cfg: bool = False  # diffusers' true CFG: rows [prompts; negative prompts]


def pack(latents):
    """NCHW ``[B, C, h, w]`` -> packed ``[B, (h/2)(w/2), 4C]`` (2x2 patches, channel-major
    within a patch, as diffusers' ``_pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed, h: int, w: int):
    """The inverse of `pack` for a latent of ``h x w``."""
    b, _, d = packed.shape
    x = packed.reshape(b, h // 2, w // 2, d // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


class FluxPipeline:
    """Flux.1 dev / schnell. Components as in diffusers: ``transformer``, ``vae``,
    ``text_encoder`` (CLIP) + ``tokenizer``, ``text_encoder_2`` (T5) + ``tokenizer_2``,
    ``scheduler`` (`FlowMatchEuler`)."""

    default_guidance_scale = 3.5
    max_sequence_length = 512  # T5 tokens
    default_strength = 0.6  # diffusers' FluxImg2ImgPipeline / SD3 img2img default

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 scheduler: FlowMatchEuler):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler = scheduler
        self.mesh = None
        self.folder = None  # the folder it was loaded from
        self._programs: dict = {}
        self._encode_jit = jax.jit(self._encode)
        self._img2img_jit = jax.jit(self._img2img_latents, static_argnums=0)

    # -- sizes

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return 128 * self.vae_scale_factor  # diffusers' default_sample_size * vae factor

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def params(self) -> dict:
        return {"transformer": self.transformer.params, "vae": self.vae.params}

    def load_lora(self, file, scale: float = 1.0) -> "FluxPipeline":
        """Fuse a LoRA ``.safetensors`` file times ``scale`` into the transformer (and the
        CLIP text encoders): diffusers/peft keys (``transformer.<module>.lora_A.weight``)
        or, for Flux, kohya / sd-scripts keys in the original layout
        (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``; see
        ``models/lora.py``). The weights are the compiled programs' arguments: nothing
        recompiles. Returns the pipeline."""
        import os

        from ..models.lora import LoraError, load_lora_into

        if self.mesh is not None:
            raise LoraError(f"LoRA on a {type(self).__name__} placed on a mesh is not "
                            f"supported yet: load it without mesh=")
        load_lora_into(self, file, scale)
        self.loras = getattr(self, "loras", []) + [(os.fspath(file), float(scale))]
        return self

    # -- text

    def _encode(self, params, clip_ids, t5_ids):
        pooled = self.text_encoder.apply(params["clip"], clip_ids).pooler_output
        return self.text_encoder_2.apply(params["t5"], t5_ids), pooled

    def encode_prompt(self, prompt, num_images_per_prompt: int = 1,
                      max_sequence_length: int = 512):
        """``(prompt_embeds [B, T, joint_dim], pooled_prompt_embeds [B, pooled_dim])`` of
        ``B = len(prompts) * num_images_per_prompt`` rows (each prompt repeated)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, "
                             f"got {prompt!r}")
        clip_ids = tokenize(self.tokenizer, prompts)
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length,
                                  truncation=True, return_tensors="np").input_ids
        embeds, pooled = self._encode_jit(
            {"clip": self.text_encoder.params, "t5": self.text_encoder_2.params},
            jnp.asarray(clip_ids, jnp.int32), jnp.asarray(t5_ids, jnp.int32))
        rep = lambda a: jnp.repeat(a, num_images_per_prompt, axis=0)  # noqa: E731
        return rep(embeds), rep(pooled)

    # -- one step, the loop, the decoder (traced)

    def _step(self, static: FluxSampleConfig, params, cond, i, carry, key):
        x, state, merge_state = carry
        tr = self.transformer
        x_in = jnp.concatenate([x, x]) if static.true_cfg else x
        timestep = jnp.broadcast_to(state.timesteps[i], (x_in.shape[0],)).astype(_F32) / 1000
        step_key = None if key is None else jax.random.fold_in(key, i)
        out = tr.apply(params["transformer"], x_in.astype(tr.dtype), cond["embeds"],
                       cond["pooled"], timestep, cond["img_ids"], cond["txt_ids"],
                       cond["guidance"], merge=static.merge, merge_state=merge_state,
                       key=step_key, grid=static.grid)
        pred = out.sample.astype(_F32)
        if static.true_cfg:  # diffusers: neg + s * (pos - neg), both passes in one batch
            pos, neg = jnp.split(pred, 2)
            pred = neg + cond["true_cfg_scale"] * (pos - neg)
        x, state = self.scheduler.step(state, pred, i, x)
        return x.astype(_F32), state, out.merge_state

    def _decode(self, params, x, static: FluxSampleConfig):
        z = self.vae.config.from_model_latents(self._from_carry(x, static))
        img = self.vae.apply_decode(params["vae"], z.astype(self.vae.dtype)).astype(_F32)
        return jnp.transpose(jnp.clip(img / 2 + 0.5, 0.0, 1.0), (0, 2, 3, 1))

    def _sample(self, static: FluxSampleConfig, params, cond, latents, state, merge_state, key):
        carry = (latents.astype(_F32), state, merge_state)
        carry = jax.lax.fori_loop(
            static.start, static.steps, lambda i, c: self._step(static, params, cond, i, c, key), carry)
        return self._decode(params, carry[0], static) if static.decode else carry[0]

    # -- image-to-image

    @property
    def _image_multiple(self) -> int:
        """What the image's sides must be multiples of: VAE factor x 2x2 packing."""
        return self.vae_scale_factor * 2

    def _to_carry(self, z):
        """NCHW model latents as the loop carries them (Flux: packed)."""
        return pack(z)

    def _from_carry(self, x, static: FluxSampleConfig):
        """The inverse of `_to_carry`: the loop's latents as NCHW model latents."""
        return unpack(x, *(2 * s for s in static.grid))

    def _check_image(self, image, strength, height, width, latents, prompt):
        """``(images NCHW in [-1, 1] or None, strength, height, width)``: the init image
        read and checked against the size and the prompts, before anything compiles."""
        if image is None:
            if strength is not None:
                raise ValueError("strength is the image-to-image option: pass image= too")
            return None, None, height, width
        if latents is not None:
            raise ValueError("latents and image exclude each other: image-to-image starts "
                             "from the encoded image (the noise comes from seed or key)")
        strength = features.check_fraction(
            "strength", self.default_strength if strength is None else strength, low_open=True)
        images = features.prepare_image(image, self._image_multiple)
        n_prompts = len(prompt) if isinstance(prompt, (list, tuple)) else 1
        if images.shape[0] not in (1, n_prompts):
            raise ValueError(f"{images.shape[0]} images for {n_prompts} prompts: give one "
                             f"image or one per prompt")
        img_h, img_w = images.shape[2:]
        if height not in (None, img_h) or width not in (None, img_w):
            raise ValueError(f"height and width ({height}x{width}) differ from the image's "
                             f"({img_h}x{img_w}): resize the image instead")
        return images, strength, img_h, img_w

    def _img2img_latents(self, rows, vae_params, images, state, start, key):
        """``(latents, loop key)``: ``images`` encoded (a posterior sample, shifted and
        scaled as the decoder undoes), gathered to the batch rows ``rows`` (static), noised
        to ``sigmas[start]`` (traced: one program for every strength) with
        ``scale_noise`` (diffusers' img2img ``prepare_latents``), in the loop's layout."""
        k_post, k_noise, k_loop = features.img2img_keys(key)
        z = self.vae.apply_encode(vae_params, images).sample(k_post).astype(_F32)
        z = self.vae.config.to_model_latents(z)[jnp.asarray(rows)]
        noise = jax.random.normal(k_noise, z.shape, _F32)
        x = self.scheduler.scale_noise(state, z, start, noise)
        return self._to_carry(x).astype(_F32), k_loop

    def _start_latents(self, images, strength, steps, batch, state, key):
        """Image-to-image's ``(start, latents, loop key)`` for ``batch`` rows (one image
        for all, or each image repeated for its prompt's images)."""
        start = features.flow_img2img_start(steps, strength)
        per = batch // images.shape[0]
        rows = tuple(i for i in range(images.shape[0]) for _ in range(per))
        return (start, *self._img2img_jit(rows, self.vae.params, jnp.asarray(images), state,
                                          jnp.int32(start), key))

    # -- true CFG

    @staticmethod
    def _check_true_cfg(scale, negative_prompt, prompt):
        """``(true_cfg_scale, negative prompts or None)``: diffusers' true CFG runs when
        ``true_cfg_scale > 1`` with a negative prompt (one string for every prompt, or one
        per prompt); either without the other is an error here (diffusers ignores it)."""
        scale = 1.0 if scale is None else scale
        if (isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer,
                                                               np.floating))
                or not np.isfinite(scale)):
            raise ValueError(f"true_cfg_scale must be a finite number, got {scale!r}")
        if negative_prompt is None:
            if scale > 1:
                raise ValueError(f"true_cfg_scale={scale} needs negative_prompt (true CFG "
                                 f"steers away from it): give one or drop true_cfg_scale")
            return float(scale), None
        if scale <= 1:
            raise ValueError("negative_prompt needs true_cfg_scale above 1 (diffusers' true "
                             "CFG, a second transformer pass); Flux's distilled guidance "
                             "(guidance_scale) takes none")
        n_prompts = len(prompt) if isinstance(prompt, (list, tuple)) else 1
        negatives = ([negative_prompt] * n_prompts if isinstance(negative_prompt, str)
                     else list(negative_prompt))
        if len(negatives) != n_prompts or not all(isinstance(p, str) for p in negatives):
            raise ValueError(f"negative_prompt must be a string or {n_prompts} strings (one "
                             f"per prompt), got {negative_prompt!r}")
        return float(scale), negatives

    # -- the call

    def _prepare(self, prompt, num_inference_steps, guidance_scale, height, width,
                 num_images_per_prompt, seed, key, latents, max_sequence_length, merge,
                 output_type, mu, negative_prompt=None, image=None, strength=None,
                 true_cfg_scale=None):
        true_cfg_scale, negatives = self._check_true_cfg(true_cfg_scale, negative_prompt, prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got "
                             f"{num_inference_steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got "
                             f"{num_images_per_prompt!r}")
        if merge is not None and not isinstance(merge, MergeMethod):
            raise ValueError(f"merge must be ToMe, ReToM or ToDo (or None), got {merge!r}")
        if merge is not None and len(merge.stages()) > 1:
            raise ValueError("FluxPipeline runs one merge configuration for every step: a "
                             "ReToM window schedule is not supported here (drop schedule=)")
        step = self.vae_scale_factor * 2
        image, strength, height, width = self._check_image(image, strength, height, width,
                                                           latents, prompt)
        height, width = height or self.default_size, width or self.default_size
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < step or v % step:
                raise ValueError(f"{name} must be a positive multiple of {step} (the VAE "
                                 f"factor x 2x2 patches), got {v!r}")
        grid = (height // step, width // step)
        embeds, pooled = self.encode_prompt(prompt, num_images_per_prompt, max_sequence_length)
        b = embeds.shape[0]
        if negatives is not None:  # true CFG: the negative rows after the positive ones
            neg, neg_pooled = self.encode_prompt(negatives, num_images_per_prompt,
                                                 max_sequence_length)
            embeds, pooled = jnp.concatenate([embeds, neg]), jnp.concatenate([pooled, neg_pooled])
        n, d = grid[0] * grid[1], self.latent_channels * 4
        if key is not None and seed is not None:
            raise ValueError("pass either seed or key, not both")
        key = key if key is not None else seed_key(0 if seed is None else seed)
        k_noise, k_loop = jax.random.split(key)
        if latents is None and image is None:
            noise = jax.random.normal(k_noise, (b, self.latent_channels, 2 * grid[0],
                                                2 * grid[1]), _F32)
            latents = pack(noise)
        elif latents is not None:
            latents = jnp.asarray(latents, _F32)
            if latents.ndim == 4:
                latents = pack(latents)
            if latents.shape != (b, n, d):
                raise ValueError(f"latents must be packed [{b}, {n}, {d}] or NCHW [{b}, "
                                 f"{self.latent_channels}, {2 * grid[0]}, {2 * grid[1]}] for "
                                 f"{height}x{width} images, got {tuple(latents.shape)}")
        sched = self.scheduler
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if sched.use_dynamic_shifting and mu is None:
            mu = sched.mu(n)
        state = sched.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
        start = 0
        if image is not None:
            start, latents, k_loop = self._start_latents(image, strength, num_inference_steps,
                                                         b, state, key)
        tc = self.transformer.config
        guidance = None
        if tc.guidance_embeds:
            g = self.default_guidance_scale if guidance_scale is None else guidance_scale
            guidance = jnp.full((embeds.shape[0],), g, _F32)
        cond = {"embeds": embeds, "pooled": pooled, "guidance": guidance,
                "img_ids": jnp.asarray(image_ids(*grid)),
                "txt_ids": jnp.zeros((embeds.shape[1], 3), _F32)}
        if negatives is not None:
            cond["true_cfg_scale"] = jnp.asarray(true_cfg_scale, _F32)
        static = FluxSampleConfig(num_inference_steps, b, grid, embeds.shape[1], merge,
                                  output_type != "latent", start, negatives is not None)
        if merge is not None:
            self.transformer.check_merge(merge, grid, key=k_loop)
        merge_state = None
        if merge is not None and merge.carries_cache:
            merge_state = self.transformer.init_merge_state((embeds.shape[0], n, d),
                                                            embeds.shape, merge, grid=grid)
        needs_key = merge is not None and getattr(merge, "use_rand", False)
        return static, (cond, latents, state, merge_state, k_loop if needs_key else None)

    def sample_program(self, static: FluxSampleConfig):
        """The jitted sampling program of ``static``: ``f(params, cond, latents, state,
        merge_state, key)`` -> images (or packed latents); what a call compiles
        (`retom_jax.analysis.tpu` lowers it for TPU slices with abstract arguments)."""
        return jax.jit(lambda p, *a: self._sample(static, p, *a))

    def _program(self, static, args):
        sig = jax.tree_util.tree_structure(args), tuple(
            (np.shape(a), str(a.dtype)) for a in jax.tree_util.tree_leaves(args))
        cache_key = (static, sig)
        compile_s = 0.0
        if cache_key not in self._programs:
            t0 = time.perf_counter()
            fn = self.sample_program(static)
            self._programs[cache_key] = fn.lower(self.params(), *args).compile()
            compile_s = time.perf_counter() - t0
        return self._programs[cache_key], compile_s

    def compile(self, prompt="", num_inference_steps: int = 28, guidance_scale=None,
                height=None, width=None, num_images_per_prompt: int = 1, *,
                negative_prompt=None, max_sequence_length: int | None = None, merge=None,
                output_type="pil", mu=None, image=None, strength=None,
                true_cfg_scale=None) -> float:
        """Compile the sampling program a call with these settings runs (prompts, seeds,
        images and guidance values do not matter; an image-to-image call's program
        depends on the number of steps its strength runs); returns the seconds spent."""
        static, args = self._prepare(prompt, num_inference_steps, guidance_scale, height,
                                     width, num_images_per_prompt, None, None, None,
                                     max_sequence_length or self.max_sequence_length, merge,
                                     output_type, mu, negative_prompt, image, strength,
                                     true_cfg_scale)
        return self._program(static, args)[1]

    def __call__(self, prompt, num_inference_steps: int = 28, guidance_scale=None,
                 height=None, width=None, num_images_per_prompt: int = 1, *,
                 negative_prompt=None, seed=None, key=None, latents=None,
                 max_sequence_length: int | None = None, merge=None, output_type: str = "pil",
                 progress: bool = False, mu=None, image=None, strength=None,
                 true_cfg_scale=None) -> PipelineOutput:
        """Generate images. ``latents``: packed ``[B, N, 64]`` (diffusers' form) or NCHW;
        ``guidance_scale`` (dev only; default 3.5); ``mu``: the shift (default: from the
        image size, as diffusers). ``image`` + ``strength`` (in (0, 1], default 0.6):
        image-to-image as diffusers' ``FluxImg2ImgPipeline`` (a PIL image, file path or
        HWC/NHWC array, one or one per prompt; its size sets the output's).
        ``true_cfg_scale`` > 1 with ``negative_prompt``: diffusers' true CFG
        (``neg + s * (pos - neg)``, positive and negative rows in one transformer batch; the
        scale is traced). Returns a `PipelineOutput` (``"latent"``: the packed latents)."""
        t0 = time.perf_counter()
        static, args = self._prepare(prompt, num_inference_steps, guidance_scale, height,
                                     width, num_images_per_prompt, seed, key, latents,
                                     max_sequence_length or self.max_sequence_length, merge,
                                     output_type, mu, negative_prompt, image, strength,
                                     true_cfg_scale)
        compile_s = 0.0
        if progress:
            out = self._interactive(static, *args)
        else:
            program, compile_s = self._program(static, args)
            out = program(self.params(), *args)
        out = np.asarray(jax.device_get(out))
        if output_type == "pil":
            from PIL import Image
            out = [Image.fromarray(im) for im in (out * 255).round().astype(np.uint8)]
        return PipelineOutput(out, compile_s, time.perf_counter() - t0 - compile_s)

    def _interactive(self, static, cond, latents, state, merge_state, key):
        """The loop from Python, one jitted step per call (the fused loop's body)."""
        if ("step", static) not in self._programs:  # kept: a second call compiles nothing
            self._programs["step", static] = jax.jit(
                lambda p, c, i, carry, k: self._step(static, p, c, i, carry, k))
            self._programs["decode", static] = jax.jit(lambda p, x: self._decode(p, x, static))
        step, decode = self._programs["step", static], self._programs["decode", static]
        params = self.params()
        carry = (latents, state, merge_state)
        bar = Progress(static.steps - static.start, desc="flux")
        for i in range(static.start, static.steps):
            carry = step(params, cond, jnp.int32(i), carry, key)
            jax.block_until_ready(carry[0])
            bar.update()
        bar.close()
        if not static.decode:
            return carry[0]
        return decode(params, carry[0])


def load_flux_pipeline(root, dtype=jnp.float32, *, scheduler=None, attention="auto",
                       param_dtype=None, variant=None, mesh=None) -> FluxPipeline:
    """A diffusers ``FluxPipeline`` folder (what `load_pipeline` calls for one)."""
    root = Path(root)
    index = weights.read_json(root, "model_index.json")
    needed = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2",
              "tokenizer_2", "scheduler")
    for name in needed:
        if not index.get(name) or not (root / name).is_dir():
            raise weights.CheckpointError(f"{root} has no {name}/ component; a FluxPipeline "
                                          f"needs {', '.join(needed)}")
    if scheduler is None:
        sched_cfg = weights.read_json(root / "scheduler", "scheduler_config.json")
        scheduler = FlowMatchEuler.from_config(sched_cfg)
    elif not isinstance(scheduler, FlowMatchEuler):
        raise ValueError(f"a FluxPipeline samples with FlowMatchEuler, got {scheduler!r}")
    common = dict(param_dtype=param_dtype, variant=variant, mesh=mesh)
    transformer = load_flux_transformer(root / "transformer", dtype, subfolder=None,
                                        attention=attention, **common)
    vae = load_vae(root / "vae", dtype, subfolder=None, attention=attention, **common)
    te = load_text_encoder(root / "text_encoder", dtype, subfolder=None, attention=attention,
                           **common)
    t5 = load_t5_encoder(root / "text_encoder_2", dtype, subfolder=None, **common)
    pipe = FluxPipeline(transformer, vae, te, load_tokenizer(root / "tokenizer", subfolder=None),
                        t5, load_t5_tokenizer(root / "tokenizer_2", subfolder=None), scheduler)
    pipe.mesh, pipe.folder = mesh, root
    return pipe
