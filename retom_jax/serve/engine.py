"""The model side of the server: a request -> a ``Job`` (its static settings, prompts and
seeds), and the runner that turns jobs of one group into one pipeline call.

Batching keeps each image what a call for it alone gives: image ``i`` of a request uses
seed ``seed + i`` and its initial noise is drawn exactly as ``pipe(prompt, seed=seed + i)``
draws it (``initial_noise``), so the batched call gets ``latents=`` stacked row by row.
The rows are padded (copies of the first row, dropped afterwards) to the next batch
bucket, so that a few compiled programs serve every batch. Within one bucket an image does
not depend on its neighbours or its row (XLA computes each row alike); two buckets'
programs may round the last float bit differently (``--buckets 8`` makes every image
come from one program, bit for bit reproducible whatever the traffic).

Requests whose result depends on the sampling key beyond the initial noise (ancestral
samplers, DDIM with eta > 0, ToMe's random destinations), image-to-image and merge maps
run alone, one ``pipe(...)`` call per image with its own seed.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .batching import Job
from .schemas import (GenerateRequest, Img2ImgRequest, Limits, RequestError,
                      decode_image, encode_png, merge_from_options, scheduler_name)

__all__ = ["Group", "Engine", "initial_noise"]


@dataclasses.dataclass(frozen=True)
class Group:
    """The settings requests must share to share one call (hashable)."""
    scheduler: Optional[str]
    steps: int
    height: int
    width: int
    guidance_scale: float
    merge: Any
    lora_scale: float
    eta: Optional[float]
    guidance_rescale: Optional[float]
    no_negative: bool          # every row without a negative prompt (None, not "")
    step_cache: Any = None
    alone: bool = False        # run alone (see the module's docstring)


@dataclasses.dataclass
class Payload:
    prompts: list          # one per image
    negatives: list        # one per image (None: no negative prompt)
    seeds: list            # one per image
    images: Optional[list] = None   # img2img: one HWC uint8 array per image
    strength: Optional[float] = None
    merge_map: Any = None  # MergeMapOptions or None


def initial_noise(pipe, seeds, height: int, width: int) -> jax.Array:
    """``[len(seeds), C, h, w]``: row ``i`` the initial noise ``pipe(..., seed=seeds[i])``
    draws for one image (the seed's key split once, the first half drawing the noise)."""
    from ..pipelines import seed_key

    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // f, width // f)
    rows = [jax.random.normal(jax.random.split(seed_key(s))[0], shape, jnp.float32)
            for s in seeds]
    return jnp.concatenate(rows)


class Engine:
    """Holds the pipeline (one per scheduler asked for, sharing the weights), builds jobs
    from requests and runs them (``run``, the batcher's runner)."""

    def __init__(self, pipe, *, limits: Limits = Limits(), buckets=(1, 2, 4, 8),
                 default_steps: int = 20, loras=(), step_cache=None, merge=None):
        if getattr(pipe, "unet", None) is None:
            raise ValueError(f"retom-jax serve runs UNet pipelines (SD 1.x/2.x, SDXL); "
                             f"{type(pipe).__name__} is not one")
        self.pipe, self.limits = pipe, limits
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"batch buckets must be positive integers, got {buckets!r}")
        self.default_steps = default_steps
        self.default_size = pipe.default_size or (512, 512)
        self.default_guidance = pipe.resolve_guidance(None)
        self.first_level = min(pipe.unet.config.attention_downsamples(), default=1)
        self.loras = [(str(f), float(s)) for f, s in loras]
        self.step_cache, self.merge = step_cache, merge
        self._base = {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2")
                      if getattr(pipe, c, None) is not None}
        self._pipes = {None: pipe}
        self._lora_scale = 1.0
        if self.loras:
            self._fuse(pipe, 1.0)
        self._times: dict = {}   # (group, bucket) -> seconds of the last call
        self.lock = threading.Lock()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    # -- requests -> jobs

    def _size(self, width, height):
        h, w = height or self.default_size[0], width or self.default_size[1]
        m, lim = self.pipe.vae_scale_factor, self.limits.max_side
        for name, v in (("width", w), ("height", h)):
            if not m <= v <= lim or v % m:
                raise RequestError(f"{name} must be a multiple of {m} in [{m}, {lim}], got {v}")
        return h, w

    def _steps(self, steps):
        steps = self.default_steps if steps is None else steps
        if not 1 <= steps <= self.limits.max_steps:
            raise RequestError(f"steps must be in [1, {self.limits.max_steps}], got {steps}")
        return steps

    def _count(self, n, what):
        if not 1 <= n <= min(self.limits.max_images, self.max_batch):
            raise RequestError(f"{what} must be in [1, "
                               f"{min(self.limits.max_images, self.max_batch)}], got {n}")
        return n

    def _group(self, *, scheduler, steps, height, width, guidance, merge, lora_scale, eta,
               rescale, negatives, step_cache=None, alone=False) -> Group:
        if guidance is not None and not np.isfinite(guidance):
            raise RequestError(f"the guidance scale must be a finite number, got {guidance}")
        for name, v in (("eta", eta), ("guidance_rescale", rescale)):
            if v is not None and not 0 <= v <= 1:
                raise RequestError(f"{name} must be in [0, 1], got {v}")
        if lora_scale is not None and not self.loras and lora_scale != 1:
            raise RequestError("lora_scale: the server has no LoRA loaded (start it with "
                               "--lora FILE)")
        if lora_scale is not None and not np.isfinite(lora_scale):
            raise RequestError(f"lora_scale must be a finite number, got {lora_scale}")
        from ..merge import ToMe
        ancestral = (scheduler == "euler_a" if scheduler is not None
                     else "Ancestral" in type(self.pipe.scheduler).__name__)
        stochastic = ancestral or bool(eta) or (isinstance(merge, ToMe) and merge.use_rand)
        return Group(scheduler, steps, height, width,
                     float(self.default_guidance if guidance is None else guidance), merge,
                     1.0 if lora_scale is None else float(lora_scale), eta, rescale,
                     all(n is None for n in negatives), step_cache, alone or stochastic)

    def from_a1111(self, r, img2img: bool) -> tuple[Job, dict]:
        """A job from an A1111 request, and the ``info`` fields it answers with."""
        n = self._count(r.batch_size * r.n_iter, "batch_size * n_iter")
        seed = int(np.random.randint(0, 2 ** 31)) if r.seed == -1 else r.seed
        if not 0 <= seed < 2 ** 128 - n:
            raise RequestError(f"seed must be -1 or in [0, 2**128), got {r.seed}")
        images = strength = None
        if img2img:
            if len(r.init_images) not in (1, n):
                raise RequestError(f"init_images: give 1 image or one per image ({n}), got "
                                   f"{len(r.init_images)}")
            images = [decode_image(t, f"init_images[{i}]") for i, t in enumerate(r.init_images)]
            images = [images[i % len(images)] for i in range(n)]
            height, width = self._size(images[0].shape[1], images[0].shape[0])
            if any(im.shape != images[0].shape for im in images):
                raise RequestError("init_images must all have the same size")
            strength = r.denoising_strength
            if not 0 < strength <= 1:
                raise RequestError(f"denoising_strength must be in (0, 1], got {strength}")
        else:
            height, width = self._size(r.width, r.height)
        steps = self._steps(r.steps)
        negative = r.negative_prompt or None
        group = self._group(scheduler=scheduler_name(r.sampler_name or r.sampler_index),
                            steps=steps, height=height, width=width, guidance=r.cfg_scale,
                            merge=self.merge, lora_scale=None, eta=r.eta, rescale=None,
                            negatives=[negative], step_cache=self.step_cache, alone=img2img)
        seeds = [seed + i for i in range(n)]
        payload = Payload([r.prompt] * n, [negative] * n, seeds, images, strength)
        info = {"prompt": r.prompt, "all_prompts": [r.prompt] * n,
                "negative_prompt": r.negative_prompt or "", "seed": seed, "all_seeds": seeds,
                "steps": steps, "cfg_scale": group.guidance_scale, "width": width,
                "height": height, "sampler_name": a1111_sampler(
                    group.scheduler, type(self.pipe.scheduler).__name__),
                "batch_size": r.batch_size,
                "n_iter": r.n_iter}
        if img2img:
            info["denoising_strength"] = strength
        return Job(None if group.alone else group, n, (group, payload)), info

    def from_native(self, r: GenerateRequest) -> tuple[Job, dict]:
        n = self._count(r.num_images, "num_images")
        if r.seed + n > 2 ** 128:
            raise RequestError("seed + num_images must stay below 2**128")
        merge = (self.merge if r.merge is None
                 else merge_from_options(r.merge, self.first_level))
        images = None
        if r.init_image is not None:
            images = [decode_image(r.init_image, "init_image")] * n
            height, width = self._size(images[0].shape[1], images[0].shape[0])
            if r.strength is not None and not 0 < r.strength <= 1:
                raise RequestError(f"strength must be in (0, 1], got {r.strength}")
        else:
            if r.strength is not None:
                raise RequestError("strength needs init_image (image-to-image)")
            height, width = self._size(r.width, r.height)
        from ..merge import ReToM, ToMe
        if r.merge_map is not None and not isinstance(merge, (ToMe, ReToM)):
            raise RequestError("merge_map needs merge.method tome or retom")
        step_cache = self._step_cache(r.step_cache)
        group = self._group(scheduler=scheduler_name(r.scheduler), steps=self._steps(r.steps),
                            height=height, width=width, guidance=r.guidance_scale,
                            merge=merge, lora_scale=r.lora_scale, eta=r.eta,
                            rescale=r.guidance_rescale, negatives=[r.negative_prompt],
                            step_cache=step_cache,
                            alone=images is not None or r.merge_map is not None)
        seeds = [r.seed + i for i in range(n)]
        payload = Payload([r.prompt] * n, [r.negative_prompt] * n, seeds, images, r.strength,
                          r.merge_map)
        info = {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "seeds": seeds,
                "steps": group.steps, "guidance_scale": group.guidance_scale,
                "width": width, "height": height,
                "scheduler": group.scheduler or type(self.pipe.scheduler).__name__,
                "merge": "none" if merge is None else repr(merge),
                "merge_method": "none" if merge is None else type(merge).__name__.lower(),
                "lora_scale": group.lora_scale if self.loras else None,
                "step_cache": None if step_cache is None else repr(step_cache)}
        return Job(None if group.alone else group, n, (group, payload)), info

    def _step_cache(self, spec):
        """The StepCache of a request's ``step_cache`` (None: the server's)."""
        if spec is None:
            return self.step_cache
        try:
            from ..pipelines import StepCache
        except ImportError:
            raise RequestError("step_cache: this retom-jax has no step cache") from None
        if spec.interval == 1:
            return None
        try:
            cache = StepCache(spec.interval, spec.depth)
            cache.check(len(self.pipe.unet.config.block_out_channels))
        except ValueError as e:
            raise RequestError(f"step_cache: {e}") from None
        return cache

    # -- pipelines

    def _pipe_for(self, scheduler):
        pipe = self._pipes.get(scheduler)
        if pipe is None:
            try:
                pipe = self.pipe.with_scheduler(scheduler)
            except ValueError as e:
                raise RequestError(str(e)) from None
            if self._lora_scale != 1.0:
                self._fuse(pipe, self._lora_scale)
            self._pipes[scheduler] = pipe
        return pipe

    def _fuse(self, pipe, scale: float) -> None:
        """``pipe``'s weights: the loaded ones with every LoRA file fused at its scale
        times ``scale`` (from the weights as loaded, so a scale gives the same weights
        whatever came before)."""
        for name, model in self._base.items():
            setattr(pipe, name, model)
        for file, s in self.loras:
            if s * scale != 0:
                pipe.load_lora(file, s * scale)

    def _set_lora_scale(self, scale: float) -> None:
        if self.loras and scale != self._lora_scale:
            for pipe in self._pipes.values():
                self._fuse(pipe, scale)
            self._lora_scale = scale

    def call_options(self, g: Group) -> dict:
        opts = dict(num_inference_steps=g.steps, guidance_scale=g.guidance_scale,
                    height=g.height, width=g.width, merge=g.merge, output_type="pil")
        if g.eta is not None:
            opts["eta"] = g.eta
        if g.guidance_rescale is not None:
            opts["guidance_rescale"] = g.guidance_rescale
        if g.step_cache is not None:
            opts["step_cache"] = g.step_cache
        return opts

    def bucket(self, rows: int) -> int:
        return next((b for b in self.buckets if b >= rows), rows)

    def warmup(self, steps=None, height=None, width=None) -> float:
        """Compile the default settings' program for every bucket; returns the seconds."""
        t0 = time.perf_counter()
        g = self._group(scheduler=None, steps=self._steps(steps),
                        height=height or self.default_size[0],
                        width=width or self.default_size[1], guidance=None, merge=self.merge,
                        lora_scale=None, eta=None, rescale=None, negatives=[None],
                        step_cache=self.step_cache)
        for b in self.buckets:
            self.pipe.compile([""] * b, **self.call_options(g))
        return time.perf_counter() - t0

    # -- running (the batcher's worker thread)

    def estimate(self, jobs) -> float | None:
        group = jobs[0].payload[0]
        rows = sum(j.rows for j in jobs)
        return self._times.get((group, self.bucket(rows) if jobs[0].group else rows))

    def run(self, jobs: list[Job]) -> list:
        """The results of jobs of one group: per job ``(PIL images, merge map or None)``."""
        group = jobs[0].payload[0]
        t0 = time.perf_counter()
        with self.lock:
            self._set_lora_scale(group.lora_scale)
            pipe = self._pipe_for(group.scheduler)
            if jobs[0].group is None:
                out = [self._run_alone(pipe, group, jobs[0].payload[1])]
                key = (group, jobs[0].rows)
            else:
                out, key = self._run_batch(pipe, group, [j.payload[1] for j in jobs])
        self._times[key] = time.perf_counter() - t0
        return out

    def _run_batch(self, pipe, g: Group, payloads):
        prompts = [p for x in payloads for p in x.prompts]
        negatives = [n or "" for x in payloads for n in x.negatives]
        seeds = [s for x in payloads for s in x.seeds]
        rows = len(prompts)
        pad = self.bucket(rows) - rows
        latents = initial_noise(pipe, seeds + [seeds[0]] * pad, g.height, g.width)
        out = pipe(prompts + [prompts[0]] * pad, latents=latents,
                   negative_prompt=None if g.no_negative else negatives + [negatives[0]] * pad,
                   **self.call_options(g)).images[:rows]
        results, i = [], 0
        for x in payloads:
            results.append((out[i:i + len(x.prompts)], None))
            i += len(x.prompts)
        return results, (g, rows + pad)

    def _run_alone(self, pipe, g: Group, x: Payload):
        from PIL import Image

        opts = self.call_options(g)
        images = []
        for i, (prompt, negative, seed) in enumerate(zip(x.prompts, x.negatives, x.seeds)):
            extra = {}
            if x.images is not None:
                extra["image"] = Image.fromarray(x.images[i])
                if x.strength is not None:
                    extra["strength"] = x.strength
            images += pipe(prompt, negative_prompt=negative, seed=seed, **opts, **extra).images
        picture = None
        if x.merge_map is not None:
            from ..eval.mergemap import merge_map

            kw = {k: v for k, v in opts.items() if k not in ("merge", "output_type")}
            if x.images is not None:
                kw["image"] = Image.fromarray(x.images[0])
                if x.strength is not None:
                    kw["strength"] = x.strength
            picture = merge_map(pipe, x.prompts[0], merge=g.merge, step=x.merge_map.step,
                                level=x.merge_map.level, seed=x.seeds[0],
                                negative_prompt=x.negatives[0], **kw).picture
        return images, picture


_A1111_NAMES = {"ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler_a": "Euler a",
                "dpm++2m": "DPM++ 2M", "dpm++2m_karras": "DPM++ 2M Karras", "DDIM": "DDIM",
                "PNDM": "PLMS", "Euler": "Euler", "EulerAncestral": "Euler a",
                "DPMSolverMultistep": "DPM++ 2M"}


def a1111_sampler(name, default_class: str) -> str:
    """The A1111 name of a scheduler (a retom-jax name, or the model's own class)."""
    key = name if name is not None else default_class
    return _A1111_NAMES.get(key, key)


def encode_result(result) -> tuple[list[str], Optional[str]]:
    images, picture = result
    return [encode_png(im) for im in images], None if picture is None else encode_png(picture)
