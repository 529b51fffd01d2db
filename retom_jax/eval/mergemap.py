"""Merge maps: which token merged into which, at one denoising step and one UNet level.

How the plan is obtained (the hook): the image is generated with a *probe* copy of the
merge config, a subclass of ``ToMe`` / ``ReToM`` with the same fields plus the level to
watch and a host-side sink. Its ``plan`` / ``plan_cached`` first send the block input they
are given (and ToMe's key, ReToM's cache) to the host with ``jax.debug.callback``, then
plan exactly as the config does; the image is unchanged. The pipeline steps from Python
(its ``callback`` mode), so the sink keeps only the watched step's inputs. The plan for the
chosen block is then recomputed on the host with the config's own public functions
(``plan`` / ``plan_cached``, ``dst_mask``, ``representatives``): ``unmerge`` of the slot
numbers gives each token's slot, and the slot's destination token (ToMe's dst, ReToM's
representative) colours the group. Generating without a merge map never sees the probe,
so the normal path is untouched.

``retom-jax generate --merge-map FILE.png`` draws it beside the final image.
"""
from __future__ import annotations

import argparse
import colorsys
import dataclasses
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..pipelines.options import img2img_start
from ..merge.methods import ReToM, ToMe
from ..merge.algorithms import window_tables
from ..merge.interface import level_of

__all__ = ["MergeMap", "merge_map", "render_merge_map", "add_merge_map_arguments"]


@dataclasses.dataclass
class MergeMap:
    """``slot_of [h, w]``: the output slot each token went to; ``dst [h, w]`` bool: the
    destination / representative tokens; ``image``: the final image (PIL); ``picture``:
    the image and the map side by side (PIL); ``step``, ``level``, ``block``: where."""

    slot_of: np.ndarray
    dst: np.ndarray
    image: object
    picture: object
    step: int
    level: int
    block: int
    merged: int


class _Sink:
    """Host side of the probe: keeps the inputs of the watched step, in program order.

    The compiled probe calls ``_deliver``, which hands its inputs to the sink of the merge
    map being made (``_ACTIVE``), so probes with equal fields share one compiled program
    across merge maps (another step, block or prompt compiles nothing new)."""

    def __init__(self, step: int):
        self.watch, self.current, self.records = step, 0, []

    def receive(self, payload, hw, downsample):
        if self.current == self.watch:
            self.records.append((jax.tree.map(np.asarray, payload), hw, downsample))

    def step_done(self, i, *_):
        self.current = i + 1


_ACTIVE: list = [None]


def _deliver(payload, hw, downsample):
    if _ACTIVE[0] is not None:
        _ACTIVE[0].receive(payload, hw, downsample)


def _probe(base, latent_hw, level):
    """A copy of ``base`` (ToMe / ReToM) that also reports the inputs of its plans at
    ``level`` to the active sink."""
    cls = type(base)

    def emit(self, metric, hw, extra):
        if level_of(self.probe_latent_hw, metric.shape[1]) != self.probe_level:
            return
        receive = partial(_deliver, hw=tuple(int(v) for v in hw),
                          downsample=self.probe_level)  # static, not traced arguments
        jax.debug.callback(receive, dict(metric=metric, **extra), ordered=True)

    def plan(self, metric, hw, key=None, *, downsample=1):
        emit(self, metric, hw, {} if key is None else {"key": jax.random.key_data(key)})
        return cls.plan(self, metric, hw, key, downsample=downsample)

    body = {"plan": plan, "__annotations__": {"probe_latent_hw": tuple, "probe_level": int},
            "probe_latent_hw": (0, 0), "probe_level": 1}
    if hasattr(cls, "plan_cached"):
        def plan_cached(self, metric, hw, cache, use_cache, *, downsample=1):
            emit(self, metric, hw, {"cache": cache, "use_cache": jnp.asarray(use_cache)})
            return cls.plan_cached(self, metric, hw, cache, use_cache, downsample=downsample)
        body["plan_cached"] = plan_cached
    # Same class name: errors and captions name the method by it.
    if cls not in _PROBE_TYPES:
        _PROBE_TYPES[cls] = dataclasses.dataclass(frozen=True)(type(cls.__name__, (cls,), body))
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return _PROBE_TYPES[cls](**fields, probe_latent_hw=tuple(latent_hw), probe_level=level)


_PROBE_TYPES: dict = {}


def _plan_slots(cfg, record, batch_row):
    """``(slot_of [N], dst [N] bool)`` of one batch row, recomputed with ``cfg``."""
    payload, hw, d = record
    metric = jnp.asarray(payload["metric"])
    B, N, _ = metric.shape
    if isinstance(cfg, ToMe):
        key = payload.get("key")
        key = None if key is None else jax.random.wrap_key_data(jnp.asarray(key))
        merge, unmerge = cfg.plan(metric, hw, key=key)
        dst = np.asarray(cfg.dst_mask(hw, key if cfg.use_rand and B % 2 == 0 else None))
        dst = np.broadcast_to(dst, (B, N))
    else:
        cache = payload.get("cache")
        if cache is not None:
            merge, unmerge, _ = cfg.plan_cached(metric, hw, cache, payload["use_cache"],
                                                downsample=d)
        else:
            merge, unmerge = cfg.plan(metric, hw, downsample=d)
        win_pos, _ = window_tables(hw, cfg.window_for(d))
        use_cache = cache is not None and bool(payload["use_cache"])
        if use_cache and cfg.cache == "plan":
            rep_pos = np.asarray(cache["plan"].out_pos)[:, -win_pos.shape[0]:]
        else:
            rep = (np.asarray(cache["representatives"]) if use_cache
                   else np.asarray(cfg.representatives(metric, hw, downsample=d)))
            rep_pos = win_pos[np.arange(win_pos.shape[0])[None], rep]
        dst = np.zeros((B, N), bool)
        np.put_along_axis(dst, rep_pos, True, axis=1)
    M = merge(metric).shape[1]
    slots = jnp.broadcast_to(jnp.arange(M, dtype=jnp.float32)[None, :, None], (B, M, 1))
    slot_of = np.asarray(unmerge(slots))[..., 0].round().astype(np.int64)
    return slot_of[batch_row], np.asarray(dst[batch_row])


def _colours(slot_of, dst):
    """RGB per token: a hue per merged group from its destination's position (the group's
    dst / representative token, else its first token), light grey when not merged."""
    flat_slot, flat_dst = slot_of.ravel(), dst.ravel()
    counts = np.bincount(flat_slot)
    anchor = np.full(counts.size, -1, np.int64)
    anchor[flat_slot[::-1]] = np.arange(flat_slot.size)[::-1]  # each group's first token
    dst_pos = np.nonzero(flat_dst)[0]
    anchor[flat_slot[dst_pos]] = dst_pos  # ... or its destination (one per group at most)
    rgb = np.full((flat_slot.size, 3), 225, np.uint8)
    for pos in np.nonzero(counts[flat_slot] > 1)[0]:
        a = anchor[flat_slot[pos]]
        r, g, b = colorsys.hsv_to_rgb((a * 0.6180339887) % 1.0, 0.55 + 0.2 * (a % 3), 0.95)
        rgb[pos] = (int(r * 255), int(g * 255), int(b * 255))
    return rgb.reshape(slot_of.shape + (3,))


def render_merge_map(image, slot_of, dst, caption: str = ""):
    """The image and the token grid side by side: tokens coloured by the destination they
    merged into (grey: not merged), destinations / representatives marked with a dot."""
    from PIL import Image, ImageDraw

    h, w = slot_of.shape
    cell = max(2, image.height // h)
    grid = Image.fromarray(_colours(slot_of, dst)).resize((w * cell, h * cell), Image.NEAREST)
    draw = ImageDraw.Draw(grid)
    r = max(1, cell // 4)
    for y, x in zip(*np.nonzero(dst)):
        cx, cy = x * cell + cell // 2, y * cell + cell // 2
        draw.rectangle([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=(20, 20, 20))
    gap, text_h = 6, 16 if caption else 0
    text_w = int(ImageDraw.Draw(grid).textlength(caption)) + 4 if caption else 0
    out = Image.new("RGB", (max(image.width + gap + grid.width, text_w),
                            max(image.height, grid.height) + text_h), "white")
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(grid, (image.width + gap, 0))
    if caption:
        ImageDraw.Draw(out).text((2, max(image.height, grid.height) + 2), caption,
                                 fill=(0, 0, 0))
    return out


def merge_map(pipe, prompt, *, merge, step: int | None = None, level: int | None = None,
              block: int = 0, num_inference_steps: int = 50, guidance_scale: float | None = None,
              **kwargs) -> MergeMap:
    """Generate ``prompt`` (first image) with ``merge`` and map the merging of the
    ``block``-th merged transformer block (in call order) at UNet downsample ``level``
    (default: the first attention level) and denoising step ``step`` (default: the middle
    one). ``kwargs`` go to the pipeline (``seed``, ``height``, ``negative_prompt`` ...)."""
    if not isinstance(merge, (ToMe, ReToM)):
        raise ValueError(f"a merge map needs ToMe or ReToM merging, got {merge!r}")
    guidance_scale = pipe.resolve_guidance(guidance_scale)
    runs = num_inference_steps  # steps counted as the pipeline counts them (img2img: the
    if kwargs.get("image") is not None:  # steps that run, from its start step on)
        strength = kwargs.get("strength")
        runs -= img2img_start(num_inference_steps,
                              pipe._default_strength if strength is None else strength)
    if step is None:
        step = runs // 2
    if not isinstance(step, int) or not 0 <= step < runs:
        raise ValueError(f"merge map step must be in [0, {runs}) (the denoising steps this "
                         f"generation runs), got {step!r}")
    if level is None:
        level = min(pipe.unet.config.attention_downsamples(), default=1)
    if not merge.applies(level) or level not in pipe.unet.config.attention_downsamples():
        raise ValueError(f"{type(merge).__name__} does not merge at UNet level (downsample) "
                         f"{level}; it merges at "
                         f"{[d for d in pipe.unet.config.attention_downsamples() if merge.applies(d)]}")
    height, width = pipe._check_size(kwargs.pop("height", None), kwargs.pop("width", None), None)
    f = pipe.vae_scale_factor
    sink = _Sink(step)
    probe = _probe(merge, (height // f, width // f), level)
    _ACTIVE[0] = sink
    try:
        out = pipe(prompt, merge=probe, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, height=height, width=width,
                   callback=sink.step_done, output_type="pil", **kwargs)
    finally:
        _ACTIVE[0] = None
    if block < 0 or block >= len(sink.records):
        raise ValueError(f"merge map block {block}: level {level} has {len(sink.records)} "
                         f"merged transformer block call(s) per step")
    record = sink.records[block]
    cfg = merge.at_step(step) if isinstance(merge, ReToM) else merge
    rows = record[0]["metric"].shape[0]
    row = rows // 2 if guidance_scale > 1 and rows % 2 == 0 else 0  # the conditional row
    slot_of, dst = _plan_slots(cfg, record, row)
    hw = record[1]
    slot_of, dst = slot_of.reshape(hw), dst.reshape(hw)
    merged = int(slot_of.size - len(np.unique(slot_of)))
    caption = (f"{type(merge).__name__} ratio {merge.ratio:g}: step {step}, level {level}, "
               f"block {block}, {hw[0]}x{hw[1]} tokens, {merged} merged")
    picture = render_merge_map(out.images[0], slot_of, dst, caption)
    return MergeMap(slot_of, dst, out.images[0], picture, step, level, block, merged)


# ----------------------------------------------------------------------------- CLI hook

def add_merge_map_arguments(g: argparse.ArgumentParser) -> None:
    """``--merge-map FILE.png`` and where to take it, on ``retom-jax generate``."""
    g.add_argument("--merge-map", default=None, metavar="FILE.png",
                   help="also save a merge map: the image beside the token grid coloured by "
                        "the destination each token merged into (tome / retom)")
    g.add_argument("--merge-map-step", type=int, default=None,
                   help="denoising step of the merge map (default: the middle one)")
    g.add_argument("--merge-map-level", type=int, default=None,
                   help="UNet level (downsample factor) of the merge map (default: the first)")
    g.add_argument("--merge-map-block", type=int, default=0,
                   help="which merged transformer block of that level, in call order (0)")


def check_merge_map_args(args, parser) -> None:
    """One-line errors for merge-map options, before any model is loaded."""
    if not args.merge_map:
        return
    if args.merge not in ("tome", "retom"):
        parser.error(f"--merge-map needs --merge tome or retom, got --merge {args.merge}")
    if Path(args.merge_map).suffix.lower() != ".png":
        parser.error(f"--merge-map {args.merge_map!r}: use a .png file name")
    step = args.merge_map_step
    if step is not None and not 0 <= step < args.steps:
        parser.error(f"--merge-map-step {step} is outside the {args.steps} steps")
    from ..io import OutputError, check_output_file

    try:
        check_output_file(args.merge_map, getattr(args, "overwrite", True), "--merge-map")
    except OutputError as e:
        parser.error(str(e))


def save_merge_map_from_args(args, parser, pipe, merge, **options) -> None:
    """Generate the first image again through the probe and save its merge map.
    ``options``: the generation's other pipeline options (init image, strength, ...)."""
    try:
        result = merge_map(pipe, args.prompt, merge=merge, step=args.merge_map_step,
                           level=args.merge_map_level, block=args.merge_map_block,
                           num_inference_steps=args.steps, guidance_scale=args.guidance,
                           negative_prompt=args.negative_prompt, height=args.height,
                           width=args.width, seed=args.seed,
                           num_images_per_prompt=args.num_images, **options)
    except ValueError as e:
        parser.error(str(e))
    from ..io import OutputError, save_image

    path = Path(args.merge_map)
    try:
        save_image(result.picture, path, overwrite=getattr(args, "overwrite", True))
    except OutputError as e:
        parser.error(str(e))
    print(f"saved merge map {path} (step {result.step}, level {result.level}, block "
          f"{result.block}: {result.merged} tokens merged)")
