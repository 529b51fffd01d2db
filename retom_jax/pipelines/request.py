"""What selects a compiled sampling program, the request a call makes, its output,
and the checks of prompts, seeds and per-prompt options.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..progress import Progress

from ..merge.checks import is_int
from ..schedulers import from_config as scheduler_from_config
from ..models.weights import CheckpointError


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
    step_cache: Any = None  # a StepCache (interval > 1), or None
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
    # step caching: the StepCache, and which calls this program runs: "full" or
    # "shallow" (the progress path: one program per kind), None (the fused loop: each
    # step picks its kind from the schedule)
    cache: Any = None
    phase: str | None = None

    @classmethod
    def of(cls, static: SampleConfig, merge, reuse) -> "StepConfig":
        merge = None if merge is None else merge.for_program(reuse)
        return cls(static.scheduler, static.guidance, static.start, merge, reuse,
                   static.step_cache)

    def phases(self, lo: int, hi: int) -> list:
        """The kinds of call among steps ``lo <= i < hi`` (``[None]`` without caching)."""
        if self.cache is None:
            return [None]
        return sorted({"full" if self.cache.is_full(i) else "shallow" for i in range(lo, hi)})

    def phase_of(self, i: int):
        return None if self.cache is None else ("full" if self.cache.is_full(i) else "shallow")


class Carry(NamedTuple):
    """What the denoising loop carries from step to step."""
    latents: jax.Array  # float32 NCHW
    scheduler_state: Any
    merge_state: Any = None  # the UNet's merge state (ReToM(cache_step=k)), or None
    feature: Any = None  # step caching: the deep feature of the last full UNet call


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
    step_cache: Any = None


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

def prompt_list(prompt, name="prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError(f"{name} is an empty list: give at least one prompt")
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")


def as_key(seed, key):
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
    if not is_int(seed):
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


def signature(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(a)), str(a.dtype)) for a in leaves)


class StepBar(Progress):
    """The sampling loop's progress: the package's one progress line
    (:class:`~retom_jax.progress.Progress`), a line per step off a terminal."""

    def __init__(self, total, desc):
        super().__init__(total, desc=desc, every=0.0)

    def update(self):
        super().update()


def to_pil(images: np.ndarray):
    from PIL import Image

    return [Image.fromarray(im) for im in (images * 255).round().astype(np.uint8)]


def per_prompt(value, name, count):
    """A string (for every prompt) or one string per prompt, as a list of ``count``."""
    if isinstance(value, str):
        return [value] * count
    values = prompt_list(value, name)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but prompt has {count}: give one "
                         f"per prompt (or one string)")
    return values


def row_labels(prompts, negatives, guidance, zero_negative):
    """What the user calls each tokenized row (counted from 1, as given)."""
    labels = [f"prompt {i + 1}" for i in range(len(prompts))]
    if not guidance or zero_negative:
        return labels
    return [f"negative prompt {i + 1}" for i in range(len(negatives))] + labels


def merge_at(merge, step):
    """``merge`` as it runs at ``step``: a ReToM window schedule resolved, others as is."""
    return None if merge is None else merge.at_step(step)


def check_merge_steps(merge, calls: int, steps: int):
    """Step options of ``merge`` that would never take effect in a loop of ``calls`` UNet
    calls (``steps`` asked for; PLMS makes one call more) are errors, not silently ignored."""
    if merge is not None:
        merge.check_steps(calls, steps)


def check_tokenizer(tokenizer, encoder, name):
    length = getattr(tokenizer, "model_max_length", None)
    if not is_int(length) or length > encoder.config.max_position_embeddings:
        raise CheckpointError(
            f"{name}'s model_max_length ({length}) must be an int no larger than its text "
            f"encoder's max_position_embeddings ({encoder.config.max_position_embeddings})")


def make_scheduler(config: dict, scheduler):
    if scheduler is not None and not isinstance(scheduler, str):
        if not all(hasattr(scheduler, a) for a in ("set_timesteps", "step", "scale_model_input",
                                                   "init_noise_sigma")):
            raise ValueError(f"scheduler must be None, a name or a retom_jax scheduler, got "
                             f"{scheduler!r}")
        return scheduler
    return scheduler_from_config(config, name=scheduler)


MAX_SIDE = 16384  # image pixels a side
LATENT_LIMIT = 1e4  # |latent| beyond this before decoding: the sampling diverged


def latents_ok(x) -> jax.Array:
    """Whether final latents are finite and within `LATENT_LIMIT` (traced)."""
    return jnp.all(jnp.isfinite(x)) & (jnp.max(jnp.abs(x)) <= LATENT_LIMIT)


def check_result(out, decoded: bool, guidance) -> None:
    """ValueError (one line) for a diverged sample: NaN images from the decoder (which
    turns a sample whose latents fail `latents_ok` into NaN), or latents that are not
    finite or beyond `LATENT_LIMIT` when they are the output."""
    out = np.asarray(out)
    bad = (not np.all(np.isfinite(out))) if decoded else (
        not np.all(np.isfinite(out)) or np.abs(out).max(initial=0) > LATENT_LIMIT)
    if bad:
        raise ValueError(f"the sampling diverged: the latents hold NaN, infinite values or "
                         f"values beyond {LATENT_LIMIT:g} before decoding (guidance_scale "
                         f"{float(guidance):g}; usual values are 1 to 20), so no image is "
                         f"returned")
