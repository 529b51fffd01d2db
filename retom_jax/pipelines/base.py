"""Text-to-image pipelines: Stable Diffusion 1.x/2.x and SDXL, with token merging.

``load_pipeline(path_or_repo_id)`` reads a diffusers pipeline folder (``model_index.json``
and its component folders), or a repo id already in the local Hugging Face cache, and
returns a :class:`StableDiffusionPipeline` or :class:`StableDiffusionXLPipeline`::

    pipe = load_pipeline("path/to/stable-diffusion-v1-5", jnp.bfloat16)
    out = pipe("a photo of a cat", num_inference_steps=30, seed=0,
               merge=ReToM(ratio=0.5, cache_step=5))
    out.images[0].save("cat.png")

How a call runs:

1. Everything the call is given is checked in Python (``ValueError`` with the reason)
   before anything is traced or compiled.
2. The prompts are tokenized on the host and encoded by one jitted function (negative and
   positive prompts in one batch).
3. One jitted function runs the whole denoising loop (``lax.fori_loop`` over the steps,
   carrying the latents, the scheduler state and, for ``ReToM(cache_step=k)``, the UNet's
   merge state) and then the VAE decoder. Its static configuration (:class:`SampleConfig`:
   scheduler, number of steps, batch, latent size, guidance on/off, merge config) is all
   that selects a compiled program: prompts, seeds, latents and the guidance scale are
   arguments, so changing them never recompiles. Compiled programs are kept per pipeline,
   keyed by that configuration.
4. ``progress=True`` (or a ``callback``) runs the same loop pieces (``_segments``) from a
   Python loop with a progress bar: one compiled step program per piece, the same step
   function as the fused loop's body; it gives the same images.

Classifier-free guidance follows diffusers: the UNet sees the batch ``[uncond, cond]`` and
``guidance_scale <= 1`` switches guidance off. SDXL conditions on the penultimate hidden
states of both text encoders (concatenated), the second encoder's projected pooled output
and ``add_time_ids = (height, width, 0, 0, height, width)``; with
``force_zeros_for_empty_prompt`` and no negative prompt its unconditional embeddings are
zeros. The latents are carried in float32 whatever the model dtype.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import options as features
from .. import sharding
from . import mesh as placement
from .memory import check_fits
from ..merge.interface import MergeMethod, loop_segments
from ..merge.checks import is_int
from ..models.weights import CheckpointError
from .step_cache import StepCache
from .request import Carry, EncodeConfig, OUTPUT_TYPES, PipelineOutput, SampleConfig, SampleRequest, StepBar, StepConfig, as_key, check_merge_steps, merge_at, prompt_list, signature, to_pil, make_scheduler
from .request import MAX_SIDE, check_result, latents_ok

_F32 = jnp.float32


# ----------------------------------------------------------------------------- pipelines

class Pipeline:
    """Shared sampling machinery; subclasses define the text conditioning."""

    _uses_latent_stats = False  # SDXL's decoder honours the VAE's latents_mean/latents_std
    mesh = None  # a jax.sharding.Mesh: calls run sharded on it (see shard / sharding.py)
    # what ``guidance_scale=None`` means: diffusers' default, unless the folder's
    # model_index.json says otherwise (``_retom_jax_guidance_scale``, as the demo's does)
    default_guidance_scale = 7.5

    def __init__(self, unet, vae, scheduler):
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        if vae.config.latent_channels != unet.config.in_channels:
            raise CheckpointError(
                f"the VAE has {vae.config.latent_channels} latent channels but the UNet takes "
                f"{unet.config.in_channels}")
        if unet.config.out_channels != unet.config.in_channels:
            raise CheckpointError("the UNet's out_channels differ from its in_channels: not a "
                                  "text-to-image UNet")
        self.scheduler_config = None  # the folder's scheduler_config.json, when loaded
        self.reset_compiled()

    def reset_compiled(self):
        self.trace_count = 0    # how many times a sampling/step function was traced
        self.compile_count = 0  # how many programs this pipeline compiled
        self._compiled: dict = {}
        self._jits = {
            "sample": jax.jit(self._sample, static_argnums=0),
            "step": jax.jit(self._step_fn, static_argnums=0),
            "finish": jax.jit(self._finish, static_argnums=0),
            "encode": jax.jit(self._encode, static_argnums=0),
            "start": jax.jit(self._start, static_argnums=0),
            "noise": jax.jit(self._noise, static_argnums=0),
            "img2img": jax.jit(self._img2img_latents, static_argnums=0),
        }
        self._compile_clock = 0.0

    # -- properties

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.vae_scale_factor

    @property
    def default_size(self) -> tuple[int, int] | None:
        s = self.unet.config.sample_size
        if s is None:
            return None
        h, w = (s, s) if is_int(s) else tuple(s)
        return int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor

    @property
    def dtype(self):
        return self.unet.dtype

    def __repr__(self):
        return (f"{type(self).__name__}(dtype={jnp.dtype(self.dtype).name}, "
                f"scheduler={type(self.scheduler).__name__}, default_size={self.default_size})")

    def shard(self, mesh) -> "Pipeline":
        """Run on ``mesh`` (``make_mesh(...)``): parameters placed by the sharding rules,
        the batch split over ``data`` x ``fsdp`` (padded to a multiple of it, the extra
        images dropped), latent rows over ``spatial``. ``load_pipeline(mesh=)`` does this
        while reading the weights."""
        return placement.shard_pipeline(self, mesh)

    def with_scheduler(self, scheduler) -> "Pipeline":
        """The same models (shared, not copied) with another scheduler: a name such as
        ``"ddim"``, ``"euler"``, ``"dpm++2m"`` (built from this pipeline's scheduler config,
        whose options carry over as in diffusers' ``from_config``) or a scheduler object."""
        config = self.scheduler_config
        if config is None:
            config = dataclasses.asdict(self.scheduler)
        new = copy.copy(self)
        new.scheduler = make_scheduler(config, scheduler)
        new.reset_compiled()
        return new

    def load_lora(self, file, scale: float = 1.0) -> "Pipeline":
        """Fuse a LoRA ``.safetensors`` file (diffusers/peft or kohya layout; UNet and text
        encoders) times ``scale`` into this pipeline's weights (``lora.py``). Steps cost
        what they cost before and nothing recompiles: the weights are the programs'
        arguments. Returns the pipeline."""
        from ..models.lora import load_lora_into

        load_lora_into(self, file, scale)
        self.loras = getattr(self, "loras", []) + [(os.fspath(file), float(scale))]
        return self

    # -- compilation cache

    def _executable(self, name, static, *args):
        """The compiled jitted function ``name`` for ``static`` and these argument shapes:
        compiled once, then kept."""
        sig = (name, static, signature(args))
        compiled = self._compiled.get(sig)
        if compiled is None:
            t0 = time.perf_counter()
            jitted = self._jits[name]
            if self.mesh is not None and name == "sample":  # explicit in/out shardings
                jitted = placement.sample_jit(self._sample, self.mesh, args, static.decode)
            compiled = jitted.lower(static, *args).compile()
            self._compile_clock += time.perf_counter() - t0
            self.compile_count += 1
            if isinstance(static, SampleConfig):  # refused before it runs out of memory
                self._check_fits(static, compiled)
            self._compiled[sig] = compiled
        return compiled

    def _check_fits(self, static: SampleConfig, compiled):
        f = self.vae_scale_factor
        leaf = jax.tree_util.tree_leaves(self.unet.params)[0]
        check_fits(compiled, next(iter(leaf.devices())), batch=static.batch,
                   height=static.latent_hw[0] * f, width=static.latent_hw[1] * f, multiple=f)

    def _run(self, name, static, *args):
        return self._executable(name, static, *args)(*args)

    # -- text conditioning (subclasses)

    def _tokenize(self, prompts, negatives, guidance, zero_negative):  # pragma: no cover
        raise NotImplementedError

    def _encode(self, static: EncodeConfig, params, ids):  # pragma: no cover
        raise NotImplementedError

    def _encode_params(self):  # pragma: no cover
        raise NotImplementedError

    def _added_cond(self, height, width, rows, options=None, guidance=False):
        return {}

    def _zero_negative(self, negative_prompt) -> bool:
        return False

    def resolve_guidance(self, guidance_scale) -> float:
        """``guidance_scale``, or the model's default when it is None."""
        return self.default_guidance_scale if guidance_scale is None else guidance_scale

    def encode_prompt(self, prompt, negative_prompt=None, num_images_per_prompt=1,
                      guidance_scale=None, height=None, width=None, **options) -> dict:
        """The UNet conditioning as a dict of arrays: ``encoder_hidden_states``
        ``[rows, tokens, dim]`` (rows ``2 * batch`` with guidance, negatives first) and,
        for SDXL, ``text_embeds`` and ``time_ids``. ``options``: ``clip_skip`` and, for
        SDXL, ``prompt_2``, ``negative_prompt_2`` and the size conditioning."""
        prompts, negatives, guidance = self._check_prompts(
            prompt, negative_prompt, self.resolve_guidance(guidance_scale))
        n = self._check_count(num_images_per_prompt)
        height, width = self._check_size(height, width, None)
        options = self._check_options(options, prompts, negative_prompt, guidance)
        if options["image"] is not None or options["guidance_rescale"] or options["eta"]:
            raise ValueError("encode_prompt takes the text options only (clip_skip, and "
                             "for SDXL prompt_2, negative_prompt_2 and the sizes)")
        return self._conditioning(prompts, negatives, negative_prompt, guidance, n, height,
                                  width, options)

    def _conditioning(self, prompts, negatives, negative_prompt, guidance, n, height, width,
                      options=None):
        options = options or {}
        zero = guidance and self._zero_negative(negative_prompt)
        ids = self._tokenize(prompts, negatives, guidance, zero, options)
        static = EncodeConfig(guidance, n, zero, options.get("clip_skip"))
        cond = dict(self._run("encode", static, self._encode_params(), ids))
        rows = cond["encoder_hidden_states"].shape[0]
        cond.update(self._added_cond(height, width, rows, options, guidance))
        return cond

    # -- the diffusers call options (features.py)

    _default_strength = 0.8  # diffusers' StableDiffusionImg2ImgPipeline default

    def _option_names(self):
        return features.COMMON_OPTIONS

    def _clip_skip_limit(self) -> int:  # pragma: no cover
        raise NotImplementedError

    def _check_options(self, options, prompts, negative_prompt, guidance) -> dict:
        """The keyword options beyond text-to-image's (``features.py``) checked, with
        their defaults filled in."""
        allowed = self._option_names()
        for name in options:
            if name not in allowed:
                if name in features.SDXL_OPTIONS:
                    raise ValueError(f"{name} is an SDXL option (StableDiffusionXLPipeline); "
                                     f"this is a {type(self).__name__}")
                raise TypeError(f"{type(self).__name__} got an unexpected argument {name!r}")
        out = {name: None for name in allowed}
        out.update(options)
        rescale = features.check_fraction("guidance_rescale", out["guidance_rescale"] or 0.0)
        if rescale and not guidance:
            raise ValueError("guidance_rescale has no effect without classifier-free guidance "
                             "(guidance_scale <= 1): raise guidance_scale or drop it")
        out["guidance_rescale"] = rescale
        out["eta"] = features.check_fraction("eta", out["eta"] or 0.0)
        if out["eta"] and not self._scheduler_has_eta():
            raise ValueError(f"eta={out['eta']} is DDIM's option: the "
                             f"{type(self.scheduler).__name__} scheduler has no eta (use "
                             f"scheduler='ddim')")
        out["clip_skip"] = features.check_clip_skip(out["clip_skip"], self._clip_skip_limit())
        if out["image"] is None:
            if out["strength"] is not None:
                raise ValueError("strength is the image-to-image option: pass image= too")
        else:
            strength = self._default_strength if out["strength"] is None else out["strength"]
            out["strength"] = features.check_fraction("strength", strength, low_open=True)
            out["image"] = features.prepare_image(out["image"], self.vae_scale_factor)
            n_img = out["image"].shape[0]
            if n_img not in (1, len(prompts)):
                raise ValueError(f"{n_img} images for {len(prompts)} prompts: give one image "
                                 f"or one per prompt")
        return out

    def _scheduler_has_eta(self) -> bool:
        import inspect

        try:
            return "eta" in inspect.signature(self.scheduler.step).parameters
        except (TypeError, ValueError):
            return False

    # -- validation

    def _check_prompts(self, prompt, negative_prompt, guidance_scale):
        prompts = prompt_list(prompt)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale,
                                                              (int, float, np.floating)):
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        guidance = float(guidance_scale) > 1.0
        negatives = None
        if negative_prompt is not None:
            if not guidance:
                raise ValueError(
                    f"negative_prompt has no effect with guidance_scale={guidance_scale} "
                    f"(classifier-free guidance is off for guidance_scale <= 1): drop the "
                    f"negative prompt or raise guidance_scale above 1")
            if isinstance(negative_prompt, str):
                negatives = [negative_prompt] * len(prompts)
            else:
                negatives = prompt_list(negative_prompt, "negative_prompt")
                if len(negatives) != len(prompts):
                    raise ValueError(
                        f"negative_prompt has {len(negatives)} entries but prompt has "
                        f"{len(prompts)}: give one negative prompt per prompt (or one string)")
        elif guidance:
            negatives = [""] * len(prompts)
        return prompts, negatives, guidance

    @staticmethod
    def _check_count(n):
        if not is_int(n) or n < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {n!r}")
        return int(n)

    def _check_size(self, height, width, latents_shape):
        f = self.vae_scale_factor
        if height is None and width is None and latents_shape is not None:
            return latents_shape[2] * f, latents_shape[3] * f
        if height is None or width is None:
            default = self.default_size
            if default is None:
                raise ValueError("the UNet config has no sample_size: pass height and width")
            height = default[0] if height is None else height
            width = default[1] if width is None else width
        for name, v in (("height", height), ("width", width)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
            if v % f:
                raise ValueError(f"{name}={v} is not a multiple of {f} (the VAE's scale "
                                 f"factor): use a multiple of {f}")
            if v > MAX_SIDE:
                raise ValueError(f"{name}={v} is more than {MAX_SIDE} pixels, beyond what any "
                                 f"Stable Diffusion model makes (SD 512-768, SDXL 1024)")
        return int(height), int(width)

    def _check_latent_room(self, shape) -> None:
        """ValueError before the noise is drawn when the latents alone (noise, latents and
        the guided batch: 4 copies) cannot fit the device's free memory; the compiled
        program's own memory check comes later, after compiling."""
        import os

        from .memory import available_bytes, format_bytes

        if os.environ.get("RETOM_JAX_MEMORY_CHECK", "1") == "0":
            return
        need = 4 * 4 * int(np.prod(shape, dtype=np.int64))
        leaf = jax.tree_util.tree_leaves(self.unet.params)[0]
        free = available_bytes(next(iter(leaf.devices())))
        if free is not None and need > free:
            raise ValueError(f"{shape[0]} image(s) of latents {shape[2]}x{shape[3]} need "
                             f"{format_bytes(need)} before sampling starts, more than the "
                             f"{format_bytes(free)} free: make fewer or smaller images")

    def _check_latents(self, latents, shape):
        if latents is None:
            return None
        if hasattr(latents, "detach"):  # a torch tensor: go through NumPy
            latents = latents.detach().cpu().numpy()
        if not isinstance(latents, jax.Array):
            latents = np.asarray(latents)
        if tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must have shape {list(shape)} (NCHW: images, latent channels, "
                f"height / {self.vae_scale_factor}, width / {self.vae_scale_factor}), got "
                f"{list(latents.shape)}")
        if not jnp.issubdtype(latents.dtype, jnp.floating):
            raise ValueError(f"latents must be a float array, got dtype {latents.dtype}")
        return jnp.asarray(latents, _F32)

    def _check_merge(self, merge, latent_hw):
        if merge is None:
            return
        # every window of a ReToM schedule must fit (anything else fails the UNet's check)
        stages = merge.stages() if isinstance(merge, MergeMethod) else [(0, merge)]
        for step, config in stages:
            try:
                self.unet.check_merge(config, latent_hw, key=jax.random.key(0))
            except ValueError as e:
                if len(stages) == 1:
                    raise
                raise ValueError(f"{e} (the schedule's windows from step {step})") from None

    def check_step_cache(self, step_cache):
        """The step cache a call runs: None for None or interval 1 (the uncached loop)."""
        if step_cache is None:
            return None
        if not isinstance(step_cache, StepCache):
            raise ValueError(f"step_cache must be StepCache(interval, depth) or None, got "
                             f"{step_cache!r}")
        step_cache.check(len(self.unet.config.block_out_channels))
        return step_cache if step_cache.active else None

    # -- the traced functions

    def _added(self, cond):
        if "text_embeds" not in cond:
            return None
        return {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}

    def _init_merge_state(self, merge, cond, latent_hw, step=None):
        """ReToM's empty cache for ``merge`` (a config without schedule), or None; ``step``
        (the counter of the state it replaces) carries over when windows change."""
        if merge is None or not merge.carries_cache:
            return None
        rows = cond["encoder_hidden_states"].shape[0]
        shape = (rows, self.unet.config.in_channels) + tuple(latent_hw)
        state = self.unet.init_merge_state(shape, cond["encoder_hidden_states"].shape,
                                           merge, self._added(cond))
        return state if step is None else dict(state, step=step)

    def _fit_cache(self, merge, previous, cond, carry: Carry) -> Carry:
        """``carry`` with ReToM's cache made afresh for ``merge`` where its windows differ
        from ``previous``'s (a window schedule's change); the step counter carries over."""
        if merge == previous or carry.merge_state is None:
            return carry
        hw = carry.latents.shape[2:]
        return carry._replace(merge_state=self._init_merge_state(
            merge, cond, hw, carry.merge_state["step"]))

    def _segments(self, static: SampleConfig, cond, carry: Carry, run) -> Carry:
        """The denoising loop, piece by piece (``merge.loop_segments``: a piece per window
        of a ReToM schedule, and the steps after ``cache_step`` apart, with ``reuse``
        fixed): before each piece ReToM's cache is refitted where the windows change, then
        ``run(step_config, lo, hi, carry)`` runs steps ``lo <= i < hi``. Both drivers use
        it: the fused program runs a piece as a ``fori_loop``, the progress path from
        Python, one compiled step program per piece."""
        n = carry.scheduler_state.timesteps.shape[0] - (static.start or 0)
        previous = merge_at(static.merge, 0)
        for lo, hi, merge, reuse in loop_segments(static.merge, n):
            carry, previous = self._fit_cache(merge, previous, cond, carry), merge
            carry = run(StepConfig.of(static, merge, reuse), lo, hi, carry)
        return carry

    def _body(self, static: StepConfig, params, cond, i, carry: Carry, key, g) -> Carry:
        """One denoising step: UNet on ``[uncond, cond]``, guidance, scheduler update.
        ``i`` counts the steps of this call (img2img starts at schedule index
        ``static.start``). ``g``: the guidance scale and rescale and DDIM's eta.
        ``static.merge``: the config of this step's loop piece, ``static.reuse`` its static
        choice to reuse ReToM's cache (see ``UNet.apply``). With step caching,
        ``static.phase`` fixes the kind of UNet call, or (None) the schedule picks it
        for step ``i``: both kinds are in the program, one runs (``lax.cond``)."""
        if static.cache is None or static.phase is not None:
            return self._step(static, params, cond, i, carry, key, g)
        full, shallow = (dataclasses.replace(static, phase=p) for p in ("full", "shallow"))
        return jax.lax.cond(
            static.cache.traced_is_full(i),
            lambda c: self._step(full, params, cond, i, c, key, g),
            lambda c: self._step(shallow, params, cond, i, c, key, g), carry)

    def _step(self, static: StepConfig, params, cond, i, carry: Carry, key, g) -> Carry:
        """``_body`` with the kind of UNet call fixed (``static.phase``)."""
        x, state, merge_state, feature = carry
        sched, merge = static.scheduler, static.merge
        i = i + (static.start or 0)  # the index into the scheduler's timesteps
        k_sched, k_merge = features.step_keys(key, i)
        x_in = jnp.concatenate([x, x], axis=0) if static.guidance else x
        x_in = sched.scale_model_input(state, x_in, i)
        t = state.timesteps[i]
        kw = dict(merge=merge, key=k_merge if merge is not None else None)
        ehs = cond["encoder_hidden_states"]
        if static.cache is None:
            pred, merge_state = self.unet.apply(params["unet"], x_in, t, ehs,
                                                self._added(cond), merge_state=merge_state,
                                                reuse=static.reuse, **kw)
        else:
            pred, merge_state, feature = self.unet.apply_cached(
                params["unet"], x_in, t, ehs, self._added(cond), depth=static.cache.depth,
                feature=feature if static.phase == "shallow" else None,
                merge_state=merge_state, reuse=static.reuse, **kw)
        pred = pred.astype(_F32)
        if static.guidance:
            uncond, text = jnp.split(pred, 2, axis=0)
            pred = uncond + g["guidance_scale"] * (text - uncond)
            pred = features.rescale_noise_cfg(pred, text, g["guidance_rescale"])
        step_kw = {"eta": g["eta"]} if self._scheduler_has_eta() else {}
        x, state = sched.step(state, pred, i, x, key=k_sched, **step_kw)
        return Carry(x.astype(_F32), state, merge_state, feature)

    def _decode(self, params, x):
        z = self.vae.config.from_model_latents(x, self._uses_latent_stats)
        img = self.vae.apply_decode(params["vae"], z.astype(self.vae.dtype)).astype(_F32)
        # A diverged sample (NaN, infinity or a blow-up) becomes NaN images, which the host
        # refuses (check_result) instead of returning a flat grey picture.
        ok = latents_ok(x) & jnp.all(jnp.isfinite(img))
        img = jnp.where(ok, img, jnp.nan)
        return jnp.transpose(jnp.clip(img / 2 + 0.5, 0.0, 1.0), (0, 2, 3, 1))

    def _finish(self, decode: bool, params, x):
        """The images (``decode``: VAE decoder, NHWC in [0, 1]) or the latents as they are;
        its program depends on nothing else of the call's configuration."""
        return self._decode(params, x) if decode else x

    @staticmethod
    def _noise(shape, key):
        """``(latents, loop key)``: unit Gaussian latents of ``shape`` drawn from ``key``."""
        k_noise, k_loop = jax.random.split(key)
        return jax.random.normal(k_noise, shape, _F32), k_loop

    def _img2img_latents(self, static, vae_params, images, state, key):
        """``(latents, loop key)`` of image-to-image: ``images`` (NCHW in [-1, 1]) encoded,
        a sample of the posterior scaled as the decoder expects, gathered to the batch
        rows ``static[2]``, then noised to the timestep at schedule index ``static[1]``
        with the scheduler's ``add_noise``."""
        sched, start, rows = static
        k_post, k_noise, k_loop = features.img2img_keys(key)
        z = self.vae.apply_encode(vae_params, images).sample(k_post).astype(_F32)
        z = self.vae.config.to_model_latents(z, self._uses_latent_stats)
        z = z[jnp.asarray(rows)]
        noise = jax.random.normal(k_noise, z.shape, _F32)
        return sched.add_noise(state, z, noise, state.timesteps[start]).astype(_F32), k_loop

    def _start(self, static: StepConfig, cond, latents, state) -> Carry:
        """The initial carry: the latents scaled by the scheduler's init_noise_sigma
        (image-to-image's noised latents as they are), and ReToM's empty cache when it
        carries one. ``static``: the first loop piece's."""
        x = latents.astype(_F32)
        if static.start is None:
            x = x * static.scheduler.init_noise_sigma(state)
        feature = None
        if static.cache is not None:  # filled by the first (full) call
            rows = cond["encoder_hidden_states"].shape[0]
            feature = jnp.zeros(self.unet.feature_shape((rows,) + x.shape[1:],
                                                        static.cache.depth), self.unet.dtype)
        return Carry(x, state, self._init_merge_state(static.merge, cond, x.shape[2:]),
                     feature)

    def _sample(self, static: SampleConfig, params, cond, latents, state, key, g):
        """The whole sampling loop and the decoder, as one traced function: each loop piece
        (``_segments``) a ``fori_loop``. Fixing ``reuse`` per piece lets XLA drop ReToM's
        fresh selection from the steps that reuse the cache."""
        self.trace_count += 1
        carry = self._start(self._first_step(static), cond, latents, state)

        def run(step: StepConfig, lo, hi, carry):
            return jax.lax.fori_loop(
                lo, hi, lambda i, c: self._body(step, params, cond, i, c, key, g), carry)

        carry = self._segments(static, cond, carry, run)
        return self._finish(static.decode, params, carry.latents)

    @property
    def sample_function(self):
        """``f(static: SampleConfig, params, cond, latents, state, key, g)``: the traced
        function of the fused sampling program (loop and decoder), for compiling it
        elsewhere (``retom_jax.analysis.tpu``)."""
        return self._sample

    def _step_fn(self, static, leaves, cond, i, carry, key, g) -> Carry:
        """One step of the progress path. ``static``: ``(StepConfig, treedef)``; the UNet
        parameters come flattened (``leaves``), so that a step's call does not walk the
        parameter tree on the host."""
        self.trace_count += 1
        step, treedef = static
        return self._body(step, jax.tree.unflatten(treedef, leaves), cond, i, carry, key, g)

    @staticmethod
    def _first_step(static: SampleConfig) -> StepConfig:
        _, _, merge, reuse = loop_segments(static.merge, 1)[0]
        return StepConfig.of(static, merge, reuse)

    # -- the call

    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int = 50,
                 guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1,
                 seed: int | None = None, key=None, latents=None, output_type: str = "pil",
                 merge=None, progress: bool = False,
                 callback: Callable | None = None, step_cache=None,
                 **options) -> PipelineOutput:
        """Generate images.

        ``prompt``: a string or a list of strings (one image batch row each, times
        ``num_images_per_prompt``). ``negative_prompt``: a string (for every prompt) or one
        per prompt; needs ``guidance_scale > 1`` (None: the model's
        ``default_guidance_scale``, 7.5 unless its folder says otherwise). ``seed`` (default 0) or ``key`` (a JAX
        PRNG key) draw the initial noise and any per-step randomness (ancestral samplers,
        ToMe's random destinations); ``latents`` (NCHW ``[images, C, H/f, W/f]``) replaces
        the drawn noise and is scaled by the scheduler's ``init_noise_sigma`` as diffusers
        does; when given without ``height`` and ``width`` it sets the size.
        ``merge``: ``ToMe(...)``, ``ReToM(...)``, ``ToDo(...)`` or None.
        ``step_cache``: ``StepCache(interval, depth)`` (DeepCache: a full UNet call every
        ``interval`` steps, only the outer ``depth`` levels in between) or None. ``progress``
        steps from Python with a progress bar; ``callback(i, latents, merge_state)`` is
        called after each step in that mode (and switches it on).

        ``options`` (as diffusers names them; see ``features.py``): ``guidance_rescale``
        (0..1), ``eta`` (DDIM, 0..1), ``clip_skip``, ``image`` + ``strength``
        (image-to-image: a PIL image, a file path or an HWC/NHWC array, one or one per
        prompt; ``strength`` in (0, 1], default 0.8, SDXL 0.3) and, for SDXL, ``prompt_2``,
        ``negative_prompt_2``, ``original_size``, ``crops_coords_top_left``,
        ``target_size`` and ``negative_original_size`` / ``negative_crops_coords_top_left``
        / ``negative_target_size``. Guidance rescale and eta are arguments of the compiled
        program (changing them never recompiles); image-to-image compiles one program per
        number of steps it runs.
        """
        t_start = time.perf_counter()
        self._compile_clock = 0.0
        static, args = self._prepare(SampleRequest(
            prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
            num_images_per_prompt, seed, key, latents, output_type, merge, callback, options,
            step_cache))
        if progress or callback is not None:
            out = self._interactive(static, *args, progress, callback)
        else:
            out = self._run("sample", static, *args)
        out = sharding.to_host(jax.block_until_ready(out))[:static.batch - static.pad]
        check_result(out, static.decode, self.resolve_guidance(guidance_scale))
        if output_type == "pil":
            out = to_pil(out)
        compile_s = self._compile_clock
        return PipelineOutput(out, compile_s, time.perf_counter() - t_start - compile_s)

    def compile(self, prompt="", negative_prompt=None, num_inference_steps: int = 50,
                guidance_scale: float | None = None, height: int | None = None,
                width: int | None = None, num_images_per_prompt: int = 1,
                output_type: str = "pil", merge=None, progress: bool = False,
                step_cache=None, **options) -> float:
        """Compile the sampling program for these options without sampling; returns the
        seconds spent compiling (0.0 when it was compiled already). A later call with the
        same options (the same number of prompts, images per prompt, steps, size, whether
        guidance is on, output type and merge config) runs it at once, whatever the prompt
        text, seed or guidance value. The text encoder does run, to shape its output.
        ``progress=True`` compiles what ``progress=True`` calls run (one program per step
        kind, the decoder) instead of the fused loop."""
        self._compile_clock = 0.0
        static, args = self._prepare(SampleRequest(
            prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
            num_images_per_prompt, output_type=output_type, merge=merge, options=options,
            step_cache=step_cache))
        if progress:
            params, cond, latents, state, key, g = args
            carry = self._run("start", self._first_step(static), cond, latents, state)
            self._step_programs(static, params, cond, carry, key, g)
        else:
            self._executable("sample", static, *args)
        return self._compile_clock

    def _prepare(self, request: SampleRequest):
        """Check every argument (nothing compiles before this passes), encode the prompts
        and draw the noise: ``(static config, (params, cond, latents, state, key, g))``;
        ``g`` holds the traced knobs (guidance scale and rescale, DDIM's eta)."""
        r = request
        prompt, negative_prompt, height, width = r.prompt, r.negative_prompt, r.height, r.width
        num_inference_steps = r.num_inference_steps
        guidance_scale = self.resolve_guidance(r.guidance_scale)
        num_images_per_prompt, seed, key, latents = (r.num_images_per_prompt, r.seed, r.key,
                                                     r.latents)
        output_type, merge, callback, options = r.output_type, r.merge, r.callback, r.options
        prompts, negatives, guidance = self._check_prompts(prompt, negative_prompt,
                                                           guidance_scale)
        n = self._check_count(num_images_per_prompt)
        options = self._check_options(options or {}, prompts, negative_prompt, guidance)
        image = options["image"]
        if not is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got "
                             f"{num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of "
                             f"{', '.join(OUTPUT_TYPES)}")
        if callback is not None and not callable(callback):
            raise ValueError("callback must be callable: callback(step, latents, merge_state)")
        batch = len(prompts) * n
        c = self.unet.config.in_channels
        given = None if latents is None else tuple(getattr(latents, "shape", ()))
        if given is not None and len(given) != 4:
            raise ValueError(f"latents must be NCHW [images, {c}, height, width], got shape "
                             f"{list(given)}")
        if image is not None:  # image-to-image: the image sets the size
            if latents is not None:
                raise ValueError("latents and image exclude each other: image-to-image "
                                 "starts from the encoded image (the noise comes from seed "
                                 "or key)")
            img_h, img_w = image.shape[2:]
            if (height not in (None, img_h)) or (width not in (None, img_w)):
                raise ValueError(f"height and width ({height}x{width}) differ from the "
                                 f"image's ({img_h}x{img_w}): resize the image instead")
            height, width = img_h, img_w
        height, width = self._check_size(height, width, given)
        f = self.vae_scale_factor
        latent_hw = (height // f, width // f)
        shape = (batch, c) + latent_hw
        self._check_latent_room(shape)
        latents = self._check_latents(latents, shape)
        self._check_merge(merge, latent_hw)
        if self.mesh is not None:
            sharding.check_split(self.mesh, self.unet.config, latent_hw, merge, batch, guidance)
        key = as_key(seed, key)
        # The scheduler validates the step count (Python errors, nothing compiled yet).
        state = self.scheduler.set_timesteps(int(num_inference_steps), shape, _F32)
        extra = {}
        if image is not None:
            extra["start"] = features.img2img_start(int(num_inference_steps),
                                                    options["strength"])
        skipped = extra.get("start", 0)  # img2img starts into the schedule
        check_merge_steps(merge, int(state.timesteps.shape[0]) - skipped,
                           int(num_inference_steps) - skipped)
        step_cache = self.check_step_cache(r.step_cache)
        static = SampleConfig(self.scheduler, int(num_inference_steps), batch, latent_hw,
                              guidance, merge, output_type != "latent", step_cache=step_cache,
                              **extra)

        cond = self._conditioning(prompts, negatives, negative_prompt, guidance, n, height,
                                  width, options)
        if image is not None:  # the encoded image, noised to the start step
            rows = (0,) * batch if image.shape[0] == 1 else tuple(
                i for i in range(image.shape[0]) for _ in range(n))
            latents, key = self._run("img2img", (self.scheduler, static.start, rows),
                                     self.vae.params, jnp.asarray(image), state, key)
        elif latents is None:  # drawn by a small program of its own: the sampler is shared
            latents, key = self._run("noise", shape, key)
        g = {"guidance_scale": jnp.asarray(guidance_scale, _F32),
             "guidance_rescale": jnp.asarray(options["guidance_rescale"], _F32),
             "eta": jnp.asarray(options["eta"], _F32)}
        params = {"unet": self.unet.params, "vae": self.vae.params}
        if self.mesh is not None:  # pad the batch, place every argument on the mesh
            return placement.place_sample_args(self, static, (params, cond, latents, state,
                                                             key, g))
        return static, (params, cond, latents, state, key, g)

    def _step_programs(self, static, params, cond, carry, key, g):
        """``(programs, leaves)``: the compiled step program of each loop piece (by its
        first step) and the UNet parameters they take, flattened once; the decoder too is
        compiled here, so that everything compiles before the loop starts (a progress bar
        then times sampling only)."""
        leaves, treedef = jax.tree.flatten({"unet": params["unet"]})
        programs = {}

        def compile_piece(step: StepConfig, lo, hi, carry):
            for phase in step.phases(lo, hi):  # one program per kind of step cache call
                before = self.compile_count
                program = programs[lo, phase] = self._executable(
                    "step", (dataclasses.replace(step, phase=phase), treedef), leaves, cond,
                    jnp.zeros((), jnp.int32), carry, key, g)
                if self.compile_count > before:  # refused before it runs out of memory
                    self._check_fits(static, program)
            return carry  # a step keeps the carry's shapes

        carry = self._segments(static, cond, carry, compile_piece)
        self._executable("finish", static.decode, {"vae": params["vae"]}, carry.latents)
        return programs, leaves

    def _interactive(self, static, params, cond, latents, state, key, g, progress, callback):
        carry = self._run("start", self._first_step(static), cond, latents, state)
        programs, leaves = self._step_programs(static, params, cond, carry, key, g)
        # The bar counts the steps that run (as asked; img2img skips the first ones);
        # PLMS's extra first UNet call is part of the first step's tick.
        steps = static.num_inference_steps - (static.start or 0)
        extra = carry.scheduler_state.timesteps.shape[0] - (static.start or 0) - steps
        bar = StepBar(steps, "denoising") if progress else None

        def run(step: StepConfig, lo, hi, carry):
            for i in range(lo, hi):
                carry = programs[lo, step.phase_of(i)](leaves, cond, jnp.asarray(i, jnp.int32),
                                                       carry, key, g)
                if bar is not None and i >= extra:
                    jax.block_until_ready(carry.latents)
                    bar.update()
                if callback is not None:
                    callback(i, carry.latents, carry.merge_state)
            return carry

        try:
            carry = self._segments(static, cond, carry, run)
        finally:
            if bar is not None:
                bar.close()
        return self._run("finish", static.decode, {"vae": params["vae"]}, carry.latents)
