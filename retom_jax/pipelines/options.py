"""The call options a Stable Diffusion user brings from diffusers, checked and prepared.

The pipelines (``pipeline.py``) take them as keyword arguments:

- ``guidance_rescale`` (0..1): rescales the guided noise prediction towards the standard
  deviation of the text-conditioned one (Lin et al. 2023, section 3.4), as diffusers'
  ``rescale_noise_cfg``; a traced value, so changing it never recompiles.
- ``eta`` (0..1): DDIM's stochasticity; the fresh noise of step ``i`` is drawn from
  :func:`step_keys` of the call's key. Also traced.
- ``clip_skip``: condition on an earlier layer of the text encoder (the positive prompts
  only, as diffusers does).
- ``image`` and ``strength``: image-to-image. :func:`prepare_image` reads the image,
  :func:`img2img_start` turns the strength into the schedule index the loop starts at.
- SDXL only: ``prompt_2``, ``negative_prompt_2``, ``original_size``,
  ``crops_coords_top_left``, ``target_size`` and their ``negative_*`` counterparts
  (:func:`add_time_ids`).

Everything here runs in Python before anything is traced, and raises a one-line
``ValueError`` naming the bad value.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["COMMON_OPTIONS", "SDXL_OPTIONS", "step_keys", "img2img_keys", "rescale_noise_cfg",
           "check_fraction", "check_clip_skip", "prepare_image", "img2img_start",
           "flow_img2img_start",
           "check_size_pair", "add_time_ids"]

COMMON_OPTIONS = ("guidance_rescale", "eta", "clip_skip", "image", "strength")
SDXL_OPTIONS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left",
                "target_size", "negative_original_size", "negative_crops_coords_top_left",
                "negative_target_size")


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_))


# ----------------------------------------------------------------------------- keys

def step_keys(key, step):
    """``(scheduler key, merge key)`` of denoising step ``step`` (its index in the
    scheduler's timesteps) from the call's loop key: what an ancestral sampler or DDIM
    with ``eta > 0`` draws its noise from, and ToMe's random destinations."""
    return jax.random.split(jax.random.fold_in(key, step))


def img2img_keys(key):
    """``(posterior key, noise key, loop key)`` of an image-to-image call: the VAE
    posterior's sample, the noise added at the start step, then the loop's key."""
    k_post, k_noise, k_loop = jax.random.split(key, 3)
    return k_post, k_noise, k_loop


# ----------------------------------------------------------------------------- guidance

def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """Mix ``noise_cfg`` with itself rescaled to ``noise_pred_text``'s standard deviation
    (per image, over C, H, W) by ``guidance_rescale`` (diffusers' ``rescale_noise_cfg``).
    A zero ``guidance_rescale`` returns ``noise_cfg`` exactly."""
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = jnp.std(noise_pred_text, axis=axes, keepdims=True)
    std_cfg = jnp.std(noise_cfg, axis=axes, keepdims=True)
    ratio = jnp.where(std_cfg > 0, std_text / jnp.where(std_cfg > 0, std_cfg, 1.0), 1.0)
    return guidance_rescale * (noise_cfg * ratio) + (1 - guidance_rescale) * noise_cfg


# ----------------------------------------------------------------------------- checks

def check_fraction(name: str, value, low_open: bool = False) -> float:
    """``value`` as a float in [0, 1] ((0, 1] with ``low_open``), or a ValueError."""
    if not _is_number(value) or not np.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    low_ok = value > 0 if low_open else value >= 0
    if not low_ok or value > 1:
        span = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {span}, got {value!r}")
    return float(value)


def check_clip_skip(value, limit: int):
    """``clip_skip``: None, or an int from 0 to ``limit`` (the text encoders' depth
    allows no more)."""
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"clip_skip must be an int or None, got {value!r}")
    if not 0 <= value <= limit:
        raise ValueError(f"clip_skip={value} is out of range: this model's text encoders "
                         f"allow 0 to {limit} layers skipped")
    return int(value)


def check_size_pair(name: str, value, positive: bool = True):
    """A ``(height, width)`` / ``(top, left)`` pair of ints as a tuple, or a ValueError."""
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
                  for v in value))
    if ok:
        ok = all(v > 0 for v in value) if positive else all(v >= 0 for v in value)
    if not ok:
        what = "positive ints" if positive else "ints >= 0"
        raise ValueError(f"{name} must be a pair of {what} like (1024, 1024), got {value!r}")
    return int(value[0]), int(value[1])


def add_time_ids(options: dict, height: int, width: int):
    """SDXL's ``(positive, negative)`` time ids, six numbers each:
    ``original_size + crops_coords_top_left + target_size``. Sizes default to the image's
    ``(height, width)`` and crops to ``(0, 0)``. With no ``negative_*`` option the
    negative ids equal the positive ones; with any of them, a missing negative size takes
    the positive one and a missing negative crop is ``(0, 0)`` (what diffusers does when
    it honours them)."""
    original = options.get("original_size") or (height, width)
    crops = options.get("crops_coords_top_left") or (0, 0)
    target = options.get("target_size") or (height, width)
    positive = tuple(original) + tuple(crops) + tuple(target)
    names = ("negative_original_size", "negative_crops_coords_top_left",
             "negative_target_size")
    if all(options.get(n) is None for n in names):
        return positive, positive
    negative = (tuple(options.get(names[0]) or original)
                + tuple(options.get(names[1]) or (0, 0))
                + tuple(options.get(names[2]) or target))
    return positive, negative


# ----------------------------------------------------------------------------- img2img

def img2img_start(num_inference_steps: int, strength: float) -> int:
    """The index into the scheduler's timesteps where image-to-image starts:
    ``num_inference_steps - int(num_inference_steps * strength)`` (diffusers'
    ``get_timesteps``; PLMS's extra warm-up entry stays in the steps run)."""
    init = min(int(num_inference_steps * strength), num_inference_steps)
    if init < 1:
        raise ValueError(
            f"strength={strength} with num_inference_steps={num_inference_steps} runs "
            f"int({num_inference_steps} * {strength}) = 0 denoising steps: raise strength "
            f"or num_inference_steps")
    return num_inference_steps - init


def flow_img2img_start(num_inference_steps: int, strength: float) -> int:
    """The schedule index where image-to-image starts on a flow-matching schedule (Flux,
    SD3): ``int(n - n * strength)``, the float arithmetic of diffusers'
    ``FluxImg2ImgPipeline`` / ``StableDiffusion3Img2ImgPipeline.get_timesteps`` (which
    rounds differently from SD's :func:`img2img_start`); at least one step runs for any
    ``strength`` in (0, 1]."""
    init = min(num_inference_steps * strength, num_inference_steps)
    start = int(max(num_inference_steps - init, 0))
    if start >= num_inference_steps:
        raise ValueError(f"strength={strength} with num_inference_steps={num_inference_steps} "
                         f"runs no denoising step: raise strength")
    return start


def _load_image_file(path) -> np.ndarray:
    from ..images import read_image

    return np.asarray(read_image(path))


def _one_image(image) -> np.ndarray:
    """A single image as an HWC (or NHWC) float32 array in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        image = _load_image_file(image)
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        from ..images import to_rgb

        image = np.asarray(to_rgb(image))
    elif hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"image must be a PIL image, a file path, or a uint8 / float array "
                         f"of RGB values, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
        raise ValueError("a float image must hold values in [0, 1] (uint8 images hold "
                         "0-255)")
    return arr


def prepare_image(image, scale_factor: int) -> np.ndarray:
    """The init image(s) as float32 NCHW in [-1, 1], as diffusers' image processor makes
    them: a PIL image, a file path, an HWC array (uint8, or float in [0, 1]), an NHWC
    batch, or a list of those of one size. Height and width must be multiples of
    ``scale_factor`` (the VAE's)."""
    if image is None:
        raise ValueError("image is None")
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("image is an empty list: give at least one image")
    arrays = []
    for item in items:
        arr = _one_image(item)
        shape = list(arr.shape)
        arr = arr[None] if arr.ndim == 3 else arr
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
            raise ValueError(f"image must be RGB, HWC (or NHWC) with 3 channels last, got "
                             f"shape {shape}")
        arrays.append(arr)
    sizes = {a.shape[1:3] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"the images have different sizes {sorted(sizes)}: give images of "
                         f"one size")
    batch = np.concatenate(arrays, axis=0)
    h, w = batch.shape[1:3]
    if h < 1 or w < 1 or h % scale_factor or w % scale_factor:
        raise ValueError(f"image is {w}x{h} pixels (width x height): both must be positive "
                         f"multiples of {scale_factor} (the VAE's scale factor); resize or "
                         f"crop it")
    return np.transpose(batch * 2.0 - 1.0, (0, 3, 1, 2)).astype(np.float32)
