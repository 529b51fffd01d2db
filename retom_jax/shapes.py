"""A synthetic captioned image set that the package makes itself: one coloured shape on a
plain coloured background, captioned "a red circle on a blue background".

It is what the demo model (``retom_jax.demo``) is trained on, so that the demo draws what
the prompt asks for without any download. Everything is deterministic given a seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["COLORS", "SHAPES", "WORDS", "caption", "render", "make_dataset", "write_folder",
           "nearest_color", "color_shares", "all_captions", "parse_caption", "check_colors"]

# Palette: names and RGB values far apart, so a pixel's nearest colour is unambiguous.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Every word a caption uses (the demo tokenizer gives each one token).
WORDS = ("a", "on", "background", *COLORS, *SHAPES)


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` centred at (cx, cy) with half-size ``r`` (pixel centres)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        s = r * 0.85  # a square of the same area as the circle would be r * 0.886
        return (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    if shape == "triangle":  # upward, apex at the top
        top, bottom = cy - r, cy + r * 0.8
        half = (y - top) / (bottom - top) * r * 1.05
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(color: str, shape: str, background: str, size: int = 64, cx: float | None = None,
           cy: float | None = None, r: float | None = None) -> np.ndarray:
    """One ``uint8 [size, size, 3]`` image (centre and half-size default to the middle and
    a quarter of the side)."""
    for name in (color, background):
        if name not in COLORS:
            raise ValueError(f"unknown colour {name!r}; known: {', '.join(COLORS)}")
    cx = size / 2 if cx is None else cx
    cy = size / 2 if cy is None else cy
    r = size / 4 if r is None else r
    image = np.empty((size, size, 3), np.uint8)
    image[:] = COLORS[background]
    image[_mask(shape, size, cx, cy, r)] = COLORS[color]
    return image


def make_dataset(n: int, size: int = 64, seed: int = 0):
    """``(images uint8 [n, size, size, 3], captions list[str])``: random shape, colours
    (shape and background differ), centre (within a sixteenth of the side from the
    middle) and half-size (between 0.18 and 0.3 of the side)."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    images = np.empty((n, size, size, 3), np.uint8)
    captions = []
    for i in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        fg, bg = rng.choice(len(names), 2, replace=False)
        cx, cy = size / 2 + rng.uniform(-size / 16, size / 16, 2)
        r = rng.uniform(0.18, 0.3) * size
        images[i] = render(names[fg], shape, names[bg], size, cx, cy, r)
        captions.append(caption(names[fg], shape, names[bg]))
    return images, captions


def write_folder(folder, n: int, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` images as PNG files with a diffusers image-folder ``metadata.jsonl``
    (``{"file_name": ..., "text": ...}`` per line); returns the folder."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, captions = make_dataset(n, size, seed)
    lines = []
    for i, (image, text) in enumerate(zip(images, captions)):
        name = f"{i:05d}.png"
        Image.fromarray(image).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def nearest_color(image: np.ndarray) -> np.ndarray:
    """Index into ``COLORS`` of each pixel's nearest palette colour: ``int [H, W]``."""
    palette = np.asarray(list(COLORS.values()), np.float32)
    d = ((np.asarray(image, np.float32)[..., None, :] - palette) ** 2).sum(-1)
    return d.argmin(-1)


def color_shares(image: np.ndarray, region=None) -> dict[str, float]:
    """Share of the pixels (of ``image[region]`` if given) nearest to each palette colour."""
    idx = nearest_color(image)
    if region is not None:
        idx = idx[region]
    counts = np.bincount(idx.reshape(-1), minlength=len(COLORS))
    return {name: float(c) / idx.size for name, c in zip(COLORS, counts)}


def all_captions() -> list[str]:
    """Every caption :func:`make_dataset` can draw: 6 shape colours x 5 other background
    colours x 3 shapes = 90."""
    return [caption(fg, shape, bg) for shape in SHAPES for fg in COLORS for bg in COLORS
            if fg != bg]


def parse_caption(text: str) -> tuple[str, str, str]:
    """``(color, shape, background)`` of a caption made by :func:`caption`."""
    words = text.split()
    if (len(words) != 7 or words[1] not in COLORS or words[2] not in SHAPES
            or words[5] not in COLORS or caption(words[1], words[2], words[5]) != text):
        raise ValueError(f"not a shapes caption: {text!r} (they read "
                         f"{caption('red', 'circle', 'blue')!r})")
    return words[1], words[2], words[5]


def check_colors(image: np.ndarray, color: str, background: str) -> dict:
    """Whether a generated ``[H, W, 3]`` image (0-255) shows ``color`` on ``background``:
    the background colour is the most common colour of the border (6/64 of the side wide)
    and covers over 60% of it, and the shape's colour is the most common other colour of
    the middle square (the central 3/8 of the side) and covers over 20% of it. Returns
    ``{"bg", "fg"}`` (the colours found) and ``{"bg_ok", "fg_ok", "both_ok"}``."""
    h, w = image.shape[:2]
    border = np.ones((h, w), bool)
    bh, bw = max(1, h * 6 // 64), max(1, w * 6 // 64)
    border[bh:h - bh, bw:w - bw] = False
    middle = np.zeros((h, w), bool)
    middle[h * 5 // 16:h * 11 // 16, w * 5 // 16:w * 11 // 16] = True
    edge, centre = color_shares(image, border), color_shares(image, middle)
    got_bg = max(edge, key=edge.get)
    others = {k: v for k, v in centre.items() if k != background}
    got_fg = max(others, key=others.get)
    bg_ok = got_bg == background and edge[background] > 0.6
    fg_ok = got_fg == color and centre[color] > 0.2
    return {"bg": got_bg, "fg": got_fg, "bg_ok": bool(bg_ok), "fg_ok": bool(fg_ok),
            "both_ok": bool(bg_ok and fg_ok)}
