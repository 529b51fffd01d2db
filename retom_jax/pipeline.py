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
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import features, sharding, weights
from .clip import load_text_encoder, load_tokenizer, tokenize
from .memory import check_fits
from .merge import MergeMethod, _is_int, loop_segments
from .schedulers import from_config as scheduler_from_config
from .unet import load_unet
from .vae import load_vae
from .weights import CheckpointError, cached_snapshot, read_json

__all__ = [
    "StableDiffusionPipeline", "StableDiffusionXLPipeline", "PipelineOutput", "SampleConfig",
    "load_pipeline", "OUTPUT_TYPES", "PIPELINE_CLASSES",
]

OUTPUT_TYPES = ("pil", "np", "latent")
_F32 = jnp.float32


# ----------------------------------------------------------------------------- static config

@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Everything that selects a compiled sampling program (hashable, a jit static arg).

    ``num_inference_steps`` is the number asked for (PLMS takes one UNet call more);
    ``batch`` the number of images; ``latent_hw`` the latent height and width;
    ``guidance`` whether classifier-free guidance is on; ``decode`` whether the VAE runs.
    """
    scheduler: Any
    num_inference_steps: int
    batch: int
    latent_hw: tuple
    guidance: bool
    merge: Any = None
    decode: bool = True
    start: int | None = None  # img2img: the schedule index the loop starts at (None: txt2img)
    # on a mesh: rows added to fill the batch shards, dropped from the output (not part of
    # the program's identity: 3 or 4 images padded to 8 share one program)
    pad: int = dataclasses.field(default=0, compare=False)


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    guidance: bool
    num_images_per_prompt: int
    zero_negative: bool = False
    clip_skip: int | None = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What selects the compiled program of one piece of the denoising loop (see
    ``merge.loop_segments``), the same in the fused loop and the progress path: the
    scheduler, guidance on/off, image-to-image's start index, the merge config of the piece
    and its static ``reuse``. Batch, size, step count and decoding are not in it (argument
    shapes and the decoder's own program cover them)."""
    scheduler: Any
    guidance: bool
    start: int | None
    merge: Any
    reuse: bool | None

    @classmethod
    def of(cls, static: SampleConfig, merge, reuse) -> "StepConfig":
        merge = None if merge is None else merge.for_program(reuse)
        return cls(static.scheduler, static.guidance, static.start, merge, reuse)


class Carry(NamedTuple):
    """What the denoising loop carries from step to step."""
    latents: jax.Array  # float32 NCHW
    scheduler_state: Any
    merge_state: Any = None  # the UNet's merge state (ReToM(cache_step=k)), or None


@dataclasses.dataclass
class SampleRequest:
    """The arguments of a call or ``compile``, as given: ``_prepare`` checks them."""
    prompt: Any
    negative_prompt: Any = None
    num_inference_steps: int = 50
    guidance_scale: float | None = None  # None: the pipeline's default_guidance_scale
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int = 1
    seed: int | None = None
    key: Any = None
    latents: Any = None
    output_type: str = "pil"
    merge: Any = None
    callback: Callable | None = None
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PipelineOutput:
    """``images``: a list of PIL images (``"pil"``), a float32 array ``[B, H, W, 3]`` in
    [0, 1] (``"np"``) or the final NCHW latents (``"latent"``). ``compile_seconds`` is the
    time spent compiling during this call (0 when everything was compiled before),
    ``run_seconds`` the rest of the call's wall time."""
    images: Any
    compile_seconds: float = 0.0
    run_seconds: float = 0.0


# ----------------------------------------------------------------------------- helpers

def _prompt_list(prompt, name="prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError(f"{name} is an empty list: give at least one prompt")
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")


def _as_key(seed, key):
    if key is not None and seed is not None:
        raise ValueError("pass either seed or key, not both")
    if key is None:
        return seed_key(0 if seed is None else seed)
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single PRNG key, got shape {key.shape}")
        return key
    arr = np.asarray(key)
    if arr.dtype == np.uint32 and arr.shape == (2,):  # a raw jax.random.PRNGKey
        return jax.random.wrap_key_data(jnp.asarray(arr))
    raise ValueError(f"key must be a PRNG key from jax.random.key(seed), got {key!r}")


SEED_LIMIT = 2 ** 128


def seed_key(seed) -> jax.Array:
    """The PRNG key of an integer seed in ``[0, 2**128)``, using every bit of it: the low
    32 bits seed the key and each further 32-bit word (up to the highest non-zero one) is
    folded in, so seeds below ``2**32`` keep their keys and no two seeds share one."""
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**128), got {seed}")
    key = jax.random.key(seed & 0xFFFFFFFF)
    seed >>= 32
    while seed:
        key = jax.random.fold_in(key, seed & 0xFFFFFFFF)
        seed >>= 32
    return key


def _signature(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(a)), str(a.dtype)) for a in leaves)


class _Bar:
    """tqdm when installed, else one printed line per step."""

    def __init__(self, total, desc):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.total, self.desc, self.n = total, desc, 0
        self.bar = tqdm(total=total, desc=desc) if tqdm is not None else None

    def update(self):
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            print(f"{self.desc}: step {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _to_pil(images: np.ndarray):
    from PIL import Image

    return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]


# ----------------------------------------------------------------------------- pipelines

class _Pipeline:
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
        self._reset_compiled()

    def _reset_compiled(self):
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
        h, w = (s, s) if _is_int(s) else tuple(s)
        return int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor

    @property
    def dtype(self):
        return self.unet.dtype

    def __repr__(self):
        return (f"{type(self).__name__}(dtype={jnp.dtype(self.dtype).name}, "
                f"scheduler={type(self.scheduler).__name__}, default_size={self.default_size})")

    def shard(self, mesh) -> "_Pipeline":
        """Run on ``mesh`` (``make_mesh(...)``): parameters placed by the sharding rules,
        the batch split over ``data`` x ``fsdp`` (padded to a multiple of it, the extra
        images dropped), latent rows over ``spatial``. ``load_pipeline(mesh=)`` does this
        while reading the weights."""
        return sharding.shard_pipeline(self, mesh)

    def with_scheduler(self, scheduler) -> "_Pipeline":
        """The same models (shared, not copied) with another scheduler: a name such as
        ``"ddim"``, ``"euler"``, ``"dpm++2m"`` (built from this pipeline's scheduler config,
        whose options carry over as in diffusers' ``from_config``) or a scheduler object."""
        config = self.scheduler_config
        if config is None:
            config = dataclasses.asdict(self.scheduler)
        new = copy.copy(self)
        new.scheduler = _make_scheduler(config, scheduler)
        new._reset_compiled()
        return new

    def load_lora(self, file, scale: float = 1.0) -> "_Pipeline":
        """Fuse a LoRA ``.safetensors`` file (diffusers/peft or kohya layout; UNet and text
        encoders) times ``scale`` into this pipeline's weights (``lora.py``). Steps cost
        what they cost before and nothing recompiles: the weights are the programs'
        arguments. Returns the pipeline."""
        from .lora import load_lora_into

        load_lora_into(self, file, scale)
        self.loras = getattr(self, "loras", []) + [(os.fspath(file), float(scale))]
        return self

    # -- compilation cache

    def _executable(self, name, static, *args):
        """The compiled jitted function ``name`` for ``static`` and these argument shapes:
        compiled once, then kept."""
        sig = (name, static, _signature(args))
        compiled = self._compiled.get(sig)
        if compiled is None:
            t0 = time.perf_counter()
            jitted = self._jits[name]
            if self.mesh is not None and name == "sample":  # explicit in/out shardings
                jitted = sharding.sample_jit(self._sample, self.mesh, args, static.decode)
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
        prompts = _prompt_list(prompt)
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
                negatives = _prompt_list(negative_prompt, "negative_prompt")
                if len(negatives) != len(prompts):
                    raise ValueError(
                        f"negative_prompt has {len(negatives)} entries but prompt has "
                        f"{len(prompts)}: give one negative prompt per prompt (or one string)")
        elif guidance:
            negatives = [""] * len(prompts)
        return prompts, negatives, guidance

    @staticmethod
    def _check_count(n):
        if not _is_int(n) or n < 1:
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
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
            if v % f:
                raise ValueError(f"{name}={v} is not a multiple of {f} (the VAE's scale "
                                 f"factor): use a multiple of {f}")
        return int(height), int(width)

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
        previous = _merge_at(static.merge, 0)
        for lo, hi, merge, reuse in loop_segments(static.merge, n):
            carry, previous = self._fit_cache(merge, previous, cond, carry), merge
            carry = run(StepConfig.of(static, merge, reuse), lo, hi, carry)
        return carry

    def _body(self, static: StepConfig, params, cond, i, carry: Carry, key, g) -> Carry:
        """One denoising step: UNet on ``[uncond, cond]``, guidance, scheduler update.
        ``i`` counts the steps of this call (img2img starts at schedule index
        ``static.start``). ``g``: the guidance scale and rescale and DDIM's eta.
        ``static.merge``: the config of this step's loop piece, ``static.reuse`` its static
        choice to reuse ReToM's cache (see ``UNet.apply``)."""
        x, state, merge_state = carry
        sched, merge = static.scheduler, static.merge
        i = i + (static.start or 0)  # the index into the scheduler's timesteps
        k_sched, k_merge = features.step_keys(key, i)
        x_in = jnp.concatenate([x, x], axis=0) if static.guidance else x
        x_in = sched.scale_model_input(state, x_in, i)
        t = state.timesteps[i]
        kw = dict(merge=merge, key=k_merge if merge is not None else None)
        ehs = cond["encoder_hidden_states"]
        pred, merge_state = self.unet.apply(params["unet"], x_in, t, ehs, self._added(cond),
                                            merge_state=merge_state, reuse=static.reuse,
                                            **kw)
        pred = pred.astype(_F32)
        if static.guidance:
            uncond, text = jnp.split(pred, 2, axis=0)
            pred = uncond + g["guidance_scale"] * (text - uncond)
            pred = features.rescale_noise_cfg(pred, text, g["guidance_rescale"])
        step_kw = {"eta": g["eta"]} if self._scheduler_has_eta() else {}
        x, state = sched.step(state, pred, i, x, key=k_sched, **step_kw)
        return Carry(x.astype(_F32), state, merge_state)

    def _decode(self, params, x):
        c = self.vae.config
        if self._uses_latent_stats and c.latents_mean is not None and c.latents_std is not None:
            mean = jnp.asarray(c.latents_mean, _F32).reshape(1, -1, 1, 1)
            std = jnp.asarray(c.latents_std, _F32).reshape(1, -1, 1, 1)
            z = x * std / c.scaling_factor + mean
        else:
            z = x / c.scaling_factor
        img = self.vae.apply_decode(params["vae"], z.astype(self.vae.dtype)).astype(_F32)
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
        c = self.vae.config
        if self._uses_latent_stats and c.latents_mean is not None and c.latents_std is not None:
            mean = jnp.asarray(c.latents_mean, _F32).reshape(1, -1, 1, 1)
            std = jnp.asarray(c.latents_std, _F32).reshape(1, -1, 1, 1)
            z = (z - mean) * c.scaling_factor / std
        else:
            z = z * c.scaling_factor
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
        return Carry(x, state, self._init_merge_state(static.merge, cond, x.shape[2:]))

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
                 callback: Callable | None = None, **options) -> PipelineOutput:
        """Generate images.

        ``prompt``: a string or a list of strings (one image batch row each, times
        ``num_images_per_prompt``). ``negative_prompt``: a string (for every prompt) or one
        per prompt; needs ``guidance_scale > 1`` (None: the model's
        ``default_guidance_scale``, 7.5 unless its folder says otherwise). ``seed`` (default 0) or ``key`` (a JAX
        PRNG key) draw the initial noise and any per-step randomness (ancestral samplers,
        ToMe's random destinations); ``latents`` (NCHW ``[images, C, H/f, W/f]``) replaces
        the drawn noise and is scaled by the scheduler's ``init_noise_sigma`` as diffusers
        does; when given without ``height`` and ``width`` it sets the size.
        ``merge``: ``ToMe(...)``, ``ReToM(...)``, ``ToDo(...)`` or None. ``progress``
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
            num_images_per_prompt, seed, key, latents, output_type, merge, callback, options))
        if progress or callback is not None:
            out = self._interactive(static, *args, progress, callback)
        else:
            out = self._run("sample", static, *args)
        out = sharding.to_host(jax.block_until_ready(out))[:static.batch - static.pad]
        if output_type == "pil":
            out = _to_pil(out)
        compile_s = self._compile_clock
        return PipelineOutput(out, compile_s, time.perf_counter() - t_start - compile_s)

    def compile(self, prompt="", negative_prompt=None, num_inference_steps: int = 50,
                guidance_scale: float | None = None, height: int | None = None,
                width: int | None = None, num_images_per_prompt: int = 1,
                output_type: str = "pil", merge=None, progress: bool = False,
                **options) -> float:
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
            num_images_per_prompt, output_type=output_type, merge=merge, options=options))
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
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
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
        latents = self._check_latents(latents, shape)
        self._check_merge(merge, latent_hw)
        if self.mesh is not None:
            sharding.check_split(self.mesh, self.unet.config, latent_hw, merge, batch, guidance)
        key = _as_key(seed, key)
        # The scheduler validates the step count (Python errors, nothing compiled yet).
        state = self.scheduler.set_timesteps(int(num_inference_steps), shape, _F32)
        extra = {}
        if image is not None:
            extra["start"] = features.img2img_start(int(num_inference_steps),
                                                    options["strength"])
        skipped = extra.get("start", 0)  # img2img starts into the schedule
        _check_merge_steps(merge, int(state.timesteps.shape[0]) - skipped,
                           int(num_inference_steps) - skipped)
        static = SampleConfig(self.scheduler, int(num_inference_steps), batch, latent_hw,
                              guidance, merge, output_type != "latent", **extra)

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
            return sharding.place_sample_args(self, static, (params, cond, latents, state,
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
            before = self.compile_count
            programs[lo] = self._executable("step", (step, treedef), leaves, cond,
                                            jnp.zeros((), jnp.int32), carry, key, g)
            if self.compile_count > before:  # refused before it runs out of memory
                self._check_fits(static, programs[lo])
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
        bar = _Bar(steps, "denoising") if progress else None

        def run(step: StepConfig, lo, hi, carry):
            for i in range(lo, hi):
                carry = programs[lo](leaves, cond, jnp.asarray(i, jnp.int32), carry, key, g)
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


class StableDiffusionPipeline(_Pipeline):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, ``last_hidden_state``."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        super().__init__(unet, vae, scheduler)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        dim = text_encoder.config.hidden_size
        if unet.config.addition_embed_type is not None:
            raise CheckpointError("this UNet expects SDXL's added conditioning: use "
                                  "StableDiffusionXLPipeline")
        if unet.config.cross_attention_dim[0] != dim:
            raise CheckpointError(
                f"the text encoder's hidden size is {dim} but the UNet's "
                f"cross_attention_dim is {unet.config.cross_attention_dim[0]}")
        _check_tokenizer(tokenizer, text_encoder, "tokenizer")

    def _encode_params(self):
        return {"text_encoder": self.text_encoder.params}

    def _tokenize(self, prompts, negatives, guidance, zero_negative, options=None):
        rows = prompts if not guidance else negatives + prompts
        return {"ids": tokenize(self.tokenizer, rows,
                                labels=_row_labels(prompts, negatives, guidance, False))}

    def _clip_skip_limit(self) -> int:
        return self.text_encoder.config.num_hidden_layers

    def _encode(self, static: EncodeConfig, params, ids):
        out = self.text_encoder.apply(params["text_encoder"], ids["ids"])
        h = out.last_hidden_state
        if static.clip_skip is not None:  # the positive prompts only, as in diffusers
            skipped = self.text_encoder.apply_final_layer_norm(
                params["text_encoder"], out.hidden_states[-(static.clip_skip + 1)])
            half = h.shape[0] // 2 if static.guidance else 0
            h = jnp.concatenate([h[:half], skipped[half:]], axis=0)
        h = jnp.repeat(h, static.num_images_per_prompt, axis=0)
        return {"encoder_hidden_states": h.astype(self.unet.dtype)}


class StableDiffusionXLPipeline(_Pipeline):
    """SDXL: two CLIP text encoders (the second with projection), added conditioning."""

    _uses_latent_stats = True
    _default_strength = 0.3  # diffusers' StableDiffusionXLImg2ImgPipeline default

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                 scheduler, force_zeros_for_empty_prompt: bool = True):
        super().__init__(unet, vae, scheduler)
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        cfg = unet.config
        if cfg.addition_embed_type != "text_time":
            raise CheckpointError("an SDXL pipeline needs a UNet with addition_embed_type "
                                  "'text_time'")
        if not text_encoder_2.config.with_projection:
            raise CheckpointError("SDXL's text_encoder_2 must be a CLIPTextModelWithProjection")
        dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
        if cfg.cross_attention_dim[0] != dim:
            raise CheckpointError(
                f"the two text encoders give {dim} features per token but the UNet's "
                f"cross_attention_dim is {cfg.cross_attention_dim[0]}")
        added = cfg.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
        if added != cfg.projection_class_embeddings_input_dim:
            raise CheckpointError(
                f"the UNet's added embedding takes {cfg.projection_class_embeddings_input_dim} "
                f"features, but text_encoder_2's projection_dim "
                f"({text_encoder_2.config.projection_dim}) and 6 time ids of "
                f"{cfg.addition_time_embed_dim} give {added}")
        _check_tokenizer(tokenizer, text_encoder, "tokenizer")
        _check_tokenizer(tokenizer_2, text_encoder_2, "tokenizer_2")
        if tokenizer.model_max_length != tokenizer_2.model_max_length:
            raise CheckpointError("tokenizer and tokenizer_2 have different model_max_length")

    def _zero_negative(self, negative_prompt) -> bool:
        return negative_prompt is None and self.force_zeros_for_empty_prompt

    def _encode_params(self):
        return {"text_encoder": self.text_encoder.params,
                "text_encoder_2": self.text_encoder_2.params}

    def _option_names(self):
        return features.COMMON_OPTIONS + features.SDXL_OPTIONS

    def _clip_skip_limit(self) -> int:
        return min(self.text_encoder.config.num_hidden_layers,
                   self.text_encoder_2.config.num_hidden_layers) - 1

    def _check_options(self, options, prompts, negative_prompt, guidance) -> dict:
        out = super()._check_options(options, prompts, negative_prompt, guidance)
        if out["prompt_2"] is not None:
            out["prompt_2"] = _per_prompt(out["prompt_2"], "prompt_2", len(prompts))
        if out["negative_prompt_2"] is not None:
            if not guidance:
                raise ValueError("negative_prompt_2 has no effect without classifier-free "
                                 "guidance (guidance_scale <= 1)")
            if self._zero_negative(negative_prompt):
                raise ValueError(
                    "negative_prompt_2 has no effect without negative_prompt: this model "
                    "uses zero unconditional embeddings then (force_zeros_for_empty_prompt); "
                    "give negative_prompt too")
            out["negative_prompt_2"] = _per_prompt(out["negative_prompt_2"],
                                                   "negative_prompt_2", len(prompts))
        for name in features.SDXL_OPTIONS[2:]:
            if out[name] is not None:
                out[name] = features.check_size_pair(name, out[name],
                                                     positive="crops" not in name)
                if name.startswith("negative_") and not guidance:
                    raise ValueError(f"{name} has no effect without classifier-free guidance "
                                     f"(guidance_scale <= 1)")
        return out

    def _tokenize(self, prompts, negatives, guidance, zero_negative, options=None):
        options = options or {}
        prompts_2 = options.get("prompt_2") or prompts
        negatives_2 = options.get("negative_prompt_2") or negatives
        both = not guidance or zero_negative
        rows = prompts if both else negatives + prompts
        rows_2 = prompts_2 if both else negatives_2 + prompts_2
        labels = _row_labels(prompts, negatives, guidance, zero_negative)
        # With the same rows both tokenizers cut alike (same length, checked): one warning.
        labels_2 = [label.replace("prompt", "prompt_2", 1) for label in labels]
        return {"ids": tokenize(self.tokenizer, rows, labels=labels),
                "ids_2": tokenize(self.tokenizer_2, rows_2, labels=labels_2,
                                  warn=rows_2 != rows)}

    def _encode(self, static: EncodeConfig, params, ids):
        o1 = self.text_encoder.apply(params["text_encoder"], ids["ids"])
        o2 = self.text_encoder_2.apply(params["text_encoder_2"], ids["ids_2"])
        h = jnp.concatenate([o1.hidden_states[-2], o2.hidden_states[-2]], axis=-1)
        if static.clip_skip is not None:  # the positive prompts only, as in diffusers
            k = -(static.clip_skip + 2)
            skipped = jnp.concatenate([o1.hidden_states[k], o2.hidden_states[k]], axis=-1)
            half = h.shape[0] // 2 if static.guidance and not static.zero_negative else 0
            h = jnp.concatenate([h[:half], skipped[half:]], axis=0)
        pooled = o2.text_embeds
        if static.zero_negative:
            h = jnp.concatenate([jnp.zeros_like(h), h], axis=0)
            pooled = jnp.concatenate([jnp.zeros_like(pooled), pooled], axis=0)
        n = static.num_images_per_prompt
        return {"encoder_hidden_states": jnp.repeat(h, n, axis=0).astype(self.unet.dtype),
                "text_embeds": jnp.repeat(pooled, n, axis=0).astype(_F32)}

    def _added_cond(self, height, width, rows, options=None, guidance=False):
        positive, negative = features.add_time_ids(options or {}, height, width)
        ids = np.array([negative] * (rows // 2) + [positive] * (rows // 2) if guidance
                       else [positive] * rows, np.float32)
        return {"time_ids": jnp.asarray(ids)}


def _per_prompt(value, name, count):
    """A string (for every prompt) or one string per prompt, as a list of ``count``."""
    if isinstance(value, str):
        return [value] * count
    values = _prompt_list(value, name)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but prompt has {count}: give one "
                         f"per prompt (or one string)")
    return values


def _row_labels(prompts, negatives, guidance, zero_negative):
    """What the user calls each tokenized row (counted from 1, as given)."""
    labels = [f"prompt {i + 1}" for i in range(len(prompts))]
    if not guidance or zero_negative:
        return labels
    return [f"negative prompt {i + 1}" for i in range(len(negatives))] + labels


def _merge_at(merge, step):
    """``merge`` as it runs at ``step``: a ReToM window schedule resolved, others as is."""
    return None if merge is None else merge.at_step(step)


def _check_merge_steps(merge, calls: int, steps: int):
    """Step options of ``merge`` that would never take effect in a loop of ``calls`` UNet
    calls (``steps`` asked for; PLMS makes one call more) are errors, not silently ignored."""
    if merge is not None:
        merge.check_steps(calls, steps)


def _check_tokenizer(tokenizer, encoder, name):
    length = getattr(tokenizer, "model_max_length", None)
    if not _is_int(length) or length > encoder.config.max_position_embeddings:
        raise CheckpointError(
            f"{name}'s model_max_length ({length}) must be an int no larger than its text "
            f"encoder's max_position_embeddings ({encoder.config.max_position_embeddings})")


# ----------------------------------------------------------------------------- loading

PIPELINE_CLASSES = {
    "StableDiffusionPipeline": (StableDiffusionPipeline,
                                ("unet", "vae", "text_encoder", "tokenizer", "scheduler")),
    "StableDiffusionXLPipeline": (StableDiffusionXLPipeline,
                                  ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                   "tokenizer_2", "scheduler")),
}


def pipeline_folder(path_or_repo_id) -> Path:
    """A local folder holding ``model_index.json``: the path itself, or the snapshot of a
    repo id in the local Hugging Face cache. Never touches the network."""
    path = Path(os.path.expanduser(str(path_or_repo_id)))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} has no model_index.json: not a diffusers pipeline "
                                  f"folder")
        return path
    if path.exists():
        raise CheckpointError(f"{path} is not a folder: a diffusers pipeline is a folder "
                              f"holding model_index.json")
    root = cached_snapshot(path_or_repo_id, "local pipeline folder")
    return pipeline_folder(root)


def read_model_index(folder) -> dict:
    return read_json(folder, "model_index.json")


def _index_guidance(index: dict, root) -> float:
    g = index.get("_retom_jax_guidance_scale", _Pipeline.default_guidance_scale)
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 < g < float("inf"):
        raise CheckpointError(f"{root}/model_index.json: _retom_jax_guidance_scale must be a "
                              f"positive number, got {g!r}")
    return float(g)


def default_guidance_scale(path_or_repo_id) -> float:
    """What ``guidance_scale=None`` means for a model, read from its ``model_index.json``
    alone (no weights): its ``_retom_jax_guidance_scale`` (diffusers ignores "_" keys; the
    demo's is 3), else diffusers' 7.5. The loaded pipeline's ``default_guidance_scale``."""
    from .demo import DEMO_ASSETS

    root = DEMO_ASSETS if str(path_or_repo_id) == "demo" else pipeline_folder(path_or_repo_id)
    return _index_guidance(read_model_index(root), root)


def load_pipeline(path_or_repo_id, dtype=jnp.float32, *, scheduler=None, attention="auto",
                  param_dtype=None, variant: str | None = None, lora=(),
                  mesh=None):
    """Load a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` folder.

    ``path_or_repo_id``: a pipeline folder (with ``model_index.json``) or a repo id in the
    local Hugging Face cache. ``dtype``: compute dtype of every model (``param_dtype``, the
    stored weights' dtype, defaults to it; an SDXL-style VAE with ``force_upcast`` decodes
    in float32 when ``dtype`` is float16). ``scheduler``: None (the folder's scheduler),
    a name (``"ddim"``, ``"pndm"``, ``"euler"``, ``"euler_a"``, ``"dpm++2m"``,
    ``"dpm++2m_karras"``, built from the folder's scheduler config) or a scheduler object.
    ``variant="fp16"`` reads the ``.fp16`` weight files. ``lora``: LoRA files fused into
    the weights at load, each a path (scale 1), ``"file:0.7"`` or ``(path, scale)``.
    ``"demo"`` is the built-in demo model (``demo.build_demo_pipeline``; a folder named
    demo is ``"./demo"``).
    ``mesh`` (``make_mesh(...)``): every parameter is read shard by shard onto the mesh
    and calls run sharded on it (see ``_Pipeline.shard``).
    """
    from .lora import parse_lora_spec

    if isinstance(lora, (str, os.PathLike)):
        lora = [lora]
    loras = [parse_lora_spec(spec) for spec in lora]  # bad entries fail before loading
    for file, _ in loras:
        if not Path(file).is_file():
            raise CheckpointError(f"LoRA file not found: {file}")
    dtype = weights.parse_dtype(dtype)
    if str(path_or_repo_id) == "demo":
        if param_dtype is not None or variant is not None:
            raise ValueError("param_dtype and variant apply to checkpoint folders, not to "
                             "the demo model")
        from .demo import build_demo_pipeline

        pipe = build_demo_pipeline(dtype, scheduler=scheduler, attention=attention)
        for file, scale in loras:
            pipe.load_lora(file, scale)
        return pipe if mesh is None else pipe.shard(mesh)
    root = pipeline_folder(path_or_repo_id)
    index = read_model_index(root)
    cls_name = index.get("_class_name")
    if cls_name not in PIPELINE_CLASSES:
        raise CheckpointError(
            f"{root}/model_index.json describes a {cls_name!r}; retom-jax loads "
            f"{', '.join(PIPELINE_CLASSES)}")
    cls, needed = PIPELINE_CLASSES[cls_name]
    for name in needed:
        entry = index.get(name)
        if name == "scheduler" and scheduler is not None and not isinstance(scheduler, str):
            continue
        if not entry or not isinstance(entry, (list, tuple)) or entry[0] is None:
            raise CheckpointError(f"{root}/model_index.json declares no {name}; a {cls_name} "
                                  f"needs {', '.join(needed)}")
        if not (root / name).is_dir():
            raise CheckpointError(f"the component folder {name}/ is missing in {root}")
    # The scheduler first: a bad name fails before any weights are read.
    sched_config = _read_scheduler_config(root) if (root / "scheduler").is_dir() else None
    sched = _make_scheduler(sched_config, scheduler)
    common = dict(param_dtype=param_dtype, variant=variant, attention=attention, mesh=mesh)
    unet = load_unet(root / "unet", dtype, subfolder=None, **common)
    vae = load_vae(root / "vae", dtype, subfolder=None, **common)
    te = load_text_encoder(root / "text_encoder", dtype, subfolder=None, **common)
    tok = load_tokenizer(root / "tokenizer", subfolder=None)
    if cls is StableDiffusionPipeline:
        pipe = StableDiffusionPipeline(unet, vae, te, tok, sched)
    else:
        te2 = load_text_encoder(root / "text_encoder_2", dtype, subfolder=None, **common)
        tok2 = load_tokenizer(root / "tokenizer_2", subfolder=None)
        pipe = StableDiffusionXLPipeline(unet, vae, te, te2, tok, tok2, sched,
                                         index.get("force_zeros_for_empty_prompt", True))
    pipe.scheduler_config = sched_config
    pipe.default_guidance_scale = _index_guidance(index, root)
    for file, scale in loras:
        pipe.load_lora(file, scale)
    if mesh is not None:
        pipe.mesh = mesh
        if loras:  # the fused weights placed by the rules again
            sharding.shard_pipeline(pipe, mesh)
    return pipe


def _make_scheduler(config: dict, scheduler):
    if scheduler is not None and not isinstance(scheduler, str):
        if not all(hasattr(scheduler, a) for a in ("set_timesteps", "step", "scale_model_input",
                                                   "init_noise_sigma")):
            raise ValueError(f"scheduler must be None, a name or a retom_jax scheduler, got "
                             f"{scheduler!r}")
        return scheduler
    return scheduler_from_config(config, name=scheduler)


def _read_scheduler_config(root: Path) -> dict:
    return read_json(root / "scheduler", "scheduler_config.json")
