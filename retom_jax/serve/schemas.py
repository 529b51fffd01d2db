"""Request and response bodies of ``retom-jax serve`` (pydantic models, so FastAPI checks
the types and writes the OpenAPI page), and the translation of a request into the
pipeline's options.

Two request dialects: the AUTOMATIC1111 web UI API (``/sdapi/v1/txt2img`` and
``/sdapi/v1/img2img``; fields it does not know, such as ``restore_faces`` or
``alwayson_scripts``, are accepted and ignored so that existing clients work unchanged)
and the native one (``/retom/v1/generate``), which adds every retom-jax option. Ranges
(size, steps, images per request) are the server's limits (``Limits``), checked after the
types, each failure a one-line message.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Txt2ImgRequest", "Img2ImgRequest", "GenerateRequest", "MergeOptions",
           "MergeMapOptions", "StepCacheOptions", "ImagesResponse", "GenerateResponse", "Limits", "RequestError",
           "SAMPLERS", "scheduler_name", "merge_from_options", "decode_image", "encode_png"]

SEED_MAX = 2 ** 32  # A1111 seeds; -1 draws one

# A1111 sampler names -> retom-jax scheduler names (None / "" keeps the model's own)
SAMPLERS = {
    "ddim": "ddim", "plms": "pndm", "pndm": "pndm", "euler": "euler", "euler a": "euler_a",
    "euler_a": "euler_a", "dpm++ 2m": "dpm++2m", "dpm++2m": "dpm++2m",
    "dpm++ 2m karras": "dpm++2m_karras", "dpm++2m_karras": "dpm++2m_karras",
}


class RequestError(ValueError):
    """A request the server refuses (HTTP ``status``, 422 unless said)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for."""
    max_side: int = 1024        # width and height, pixels
    max_steps: int = 150
    max_images: int = 8         # images per request (batch_size * n_iter)
    max_body_bytes: int = 16 * 2 ** 20


class _A1111(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: Optional[str] = ""
    seed: int = -1
    steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None  # older clients name the sampler here
    eta: Optional[float] = None


class Txt2ImgRequest(_A1111):
    """``POST /sdapi/v1/txt2img`` (the AUTOMATIC1111 API's fields that apply)."""


class Img2ImgRequest(_A1111):
    """``POST /sdapi/v1/img2img``: ``init_images`` (base64 PNG/JPEG, optionally as a
    ``data:`` URL; one, or one per image) and ``denoising_strength`` in (0, 1]."""
    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = 0.75


class MergeOptions(BaseModel):
    """Token merging: ``method`` none / tome / retom / todo and its options (as
    ``retom-jax generate``'s --merge, --ratio, --window, ...)."""
    model_config = ConfigDict(extra="forbid")

    method: Literal["none", "tome", "retom", "todo"] = "none"
    ratio: Optional[float] = None
    window: Optional[tuple[int, int]] = None
    matching: Optional[Literal["local", "global"]] = None
    cache_step: Optional[int] = None
    max_downsample: Optional[int] = None
    todo_factor: Optional[int] = None


class MergeMapOptions(BaseModel):
    """Where to draw the merge map: denoising ``step`` (default the middle one) and UNet
    ``level`` (default the first attention level)."""
    model_config = ConfigDict(extra="forbid")

    step: Optional[int] = None
    level: Optional[int] = None


class StepCacheOptions(BaseModel):
    """Step caching (DeepCache): a full UNet call every ``interval`` steps, in between only
    the outer ``depth`` levels on the cached deeper feature (interval 1: none)."""
    model_config = ConfigDict(extra="forbid")

    interval: int = Field(ge=1, le=1000)
    depth: int = Field(1, ge=1, le=16)


class GenerateRequest(BaseModel):
    """``POST /retom/v1/generate`` and ``/retom/v1/jobs``: every retom-jax option. Image
    ``i`` of a request is drawn with seed ``seed + i`` (as the A1111 API does)."""
    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: Optional[str] = None
    seed: int = Field(0, ge=0, lt=2 ** 128)
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    num_images: int = 1
    scheduler: Optional[str] = None
    merge: Optional[MergeOptions] = None  # None: the server's --merge
    lora_scale: Optional[float] = None
    step_cache: Optional[StepCacheOptions] = None  # None: the server's --step-cache
    eta: Optional[float] = None
    guidance_rescale: Optional[float] = None
    init_image: Optional[str] = None
    strength: Optional[float] = None
    merge_map: Optional[MergeMapOptions] = None


class ImagesResponse(BaseModel):
    """The A1111 answer: base64 PNGs, the request's parameters, ``info`` a JSON string
    (seed, all_seeds, prompt, ...)."""
    images: list[str]
    parameters: dict
    info: str


class GenerateResponse(BaseModel):
    images: list[str]
    seeds: list[int]
    merge_map: Optional[str] = None
    info: dict
    seconds: float


# ----------------------------------------------------------------------------- helpers

def scheduler_name(name: Optional[str]) -> Optional[str]:
    """A1111's sampler name (or a retom-jax one) -> retom-jax's, None for the model's."""
    if name is None or not name.strip():
        return None
    key = name.strip().lower()
    if key not in SAMPLERS:
        raise RequestError(f"unknown sampler {name!r}; choose one of "
                           f"{', '.join(sorted({'DDIM', 'PLMS', 'Euler', 'Euler a', 'DPM++ 2M', 'DPM++ 2M Karras'}))}")
    return SAMPLERS[key]


def merge_from_options(m: MergeOptions, first_level: int):
    """The merge config (``ReToM(...)``, ...) of ``m``, or None; RequestError for an
    option of another method or a value the method refuses."""
    from ..merge import METHOD_OPTIONS, from_options

    for name in ("ratio", "window", "matching", "cache_step", "todo_factor", "max_downsample"):
        methods = METHOD_OPTIONS[name]
        if getattr(m, name) is not None and m.method not in methods:
            raise RequestError(f"merge.{name} is an option of {' or '.join(methods)}, not of "
                               f"{m.method}")
    given = {"ratio": m.ratio, "window": None if m.window is None else tuple(m.window),
             "matching": m.matching, "cache_step": m.cache_step, "todo_factor": m.todo_factor}
    try:
        return from_options(m.method, max_downsample=m.max_downsample or first_level,
                            **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise RequestError(f"merge: {e}") from None


def decode_image(text: str, what: str = "init_images") -> np.ndarray:
    """A base64 image (PNG, JPEG ...; a ``data:image/...;base64,`` prefix is allowed) as an
    RGB uint8 array ``[H, W, 3]``; RequestError (400) if it is not one."""
    from PIL import Image, UnidentifiedImageError

    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: not valid base64", 400) from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise RequestError(f"{what}: base64 that is not an image PIL reads (PNG, JPEG)",
                           400) from None


def encode_png(image) -> str:
    """A PIL image as base64 PNG text."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
