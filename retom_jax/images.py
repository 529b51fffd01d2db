"""Reading image files the same way everywhere (training data, img2img / inpainting
inputs, eval reference and output images), with one conversion rule to 8-bit RGB:

- 8-bit RGB, grayscale (``L``), palette and CMYK images convert as PIL converts them.
- 16- and 32-bit integer images (``I;16``, ``I``: 16-bit grayscale PNG / TIFF) are read
  as 16-bit values and scaled to 8 bits (``round(v * 255 / 65535)``): a 16-bit gradient
  stays a gradient (PIL's own ``convert("RGB")`` clips every value above 255 to white).
- Float images (``F``) are refused: their range is not defined.
- Transparency (``RGBA``, ``LA``, ``PA``, a palette or grayscale image with a transparent
  colour) is composited on white, as a viewer shows it on a white page.

A file that is missing, not an image, truncated, or larger than PIL's decompression-bomb
limit is a ``ValueError`` of one line naming it; callers re-raise it as their own error.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["to_rgb", "read_image", "check_image_file", "ImageFileError"]


class ImageFileError(ValueError):
    """An image file that is missing, unreadable or of a kind that is not converted."""


def to_rgb(image):
    """A PIL image as 8-bit RGB by the module's rule (a new image; the input is kept)."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode == "F":
        raise ImageFileError("a floating-point image has no defined range: save it as "
                             "8- or 16-bit")
    if mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I" (32-bit int)
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" or (mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path, what: str = "image"):
    """The image file ``path`` as an 8-bit RGB PIL image (:func:`to_rgb`); ImageFileError
    (one line naming the file) for anything else."""
    from PIL import Image

    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ImageFileError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except ImageFileError as e:
        raise ImageFileError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure of a decoder on a bad file
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ImageFileError(f"{path} cannot be read as an image ({why})") from None


def check_image_file(path, what: str = "image") -> tuple[int, int]:
    """``(width, height)`` of an image file after a quick integrity check (PIL's
    ``verify``: chunk checksums and the end of the file, without decoding the pixels);
    ImageFileError for a missing, non-image or truncated file."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        return size
    except Exception as e:  # noqa: BLE001 - any failure of a decoder on a bad file
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ImageFileError(f"{path} cannot be read as an image ({why})") from None
