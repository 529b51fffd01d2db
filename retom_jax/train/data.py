"""Training data: an image folder with captions, encoded once to latents and text
states (cached), and the batches drawn from it.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..pipelines.save import is_writer
from .checkpoints import fingerprint
from .trainer import TrainError


# --------------------------------------------------------------------------- data

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _center_crop_resize(image, resolution: int, with_coords: bool = False):
    """As diffusers' training scripts: resize the shorter side to ``resolution``
    (bilinear), then crop the centre square. uint8 [resolution, resolution, 3]; with
    ``with_coords`` also ``(height, width, top, left)``: the original size and the crop's
    top-left corner (SDXL's size conditioning)."""
    from PIL import Image

    from ..images import to_rgb

    image = to_rgb(image)
    w, h = image.size
    # torchvision's Resize(resolution): the longer side truncated; CenterCrop's rounding
    nw, nh = ((resolution, int(resolution * h / w)) if w <= h
              else (int(resolution * w / h), resolution))
    image = image.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - resolution) / 2.0)), int(round((nh - resolution) / 2.0))
    out = np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.uint8)
    return (out, (h, w, top, left)) if with_coords else out


def read_metadata(folder, caption_column: str = "text") -> list[tuple[Path, str]]:
    """``[(image path, caption)]`` from a diffusers image folder's ``metadata.jsonl``
    (one JSON object per line with ``file_name`` and the caption column). TrainError (one
    line) for a missing or empty folder, bad lines, missing files or captions, and image
    files the metadata does not caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainError(f"data folder {folder} does not exist")
    meta = folder / "metadata.jsonl"
    images = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not meta.is_file():
        what = f"{len(images)} images but " if images else "no images and "
        raise TrainError(f"data folder {folder} has {what}no metadata.jsonl (the diffusers "
                         f"image-folder layout: one line per image, "
                         f'{{"file_name": "0001.png", "{caption_column}": "a caption"}})')
    rows = []
    try:
        text = meta.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"{meta} cannot be read: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TrainError(f"{meta} line {n} is not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise TrainError(f"{meta} line {n} has no \"file_name\"")
        caption = row.get(caption_column)
        if not isinstance(caption, str):
            raise TrainError(f"{meta} line {n} ({row['file_name']}) has no "
                             f"\"{caption_column}\" caption")
        path = folder / row["file_name"]
        if not path.is_file():
            raise TrainError(f"{meta} line {n}: the image {path} does not exist")
        rows.append((path, caption))
    if not rows:
        raise TrainError(f"data folder {folder} is empty: {meta.name} lists no images")
    listed = {p.name for p, _ in rows if p.parent == folder}
    orphans = [name for name in images if name not in listed]
    if orphans:
        raise TrainError(f"{len(orphans)} image(s) in {folder} have no caption in "
                         f"{meta.name}: {', '.join(orphans[:5])}" + (" ..." if len(orphans) > 5
                                                                     else ""))
    return rows


def load_image_folder(folder, resolution: int, caption_column: str = "text",
                      with_sizes: bool = False):
    """``(images uint8 [N, resolution, resolution, 3], captions)`` of a diffusers image
    folder, centre-cropped and resized (see :func:`read_metadata` for the errors); with
    ``with_sizes`` also ``[N, 4]`` int32 ``(height, width, crop top, crop left)``."""
    from ..images import read_image

    rows = read_metadata(folder, caption_column)
    images, sizes = [], []
    for path, _ in rows:
        try:
            image, size = _center_crop_resize(read_image(path, "training image"), resolution,
                                              with_coords=True)
        except ValueError as e:
            raise TrainError(str(e)) from None
        images.append(image)
        sizes.append(size)
    captions = [c for _, c in rows]
    if with_sizes:
        return np.stack(images), captions, np.asarray(sizes, np.int32)
    return np.stack(images), captions


def data_fingerprint(folder, resolution: int, caption_column: str, model_tag: str) -> str:
    rows = read_metadata(folder, caption_column)
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns, c) for p, c in rows]
    return fingerprint(stats, resolution, model_tag)


def encode_dataset(vae, text_encoder, tokenizer, images: np.ndarray, captions: list[str],
                   chunk: int = 8) -> dict:
    """Run the VAE encoder and the text encoder once over the data set: posterior means and
    standard deviations (NCHW float32), the hidden states of each distinct caption and of
    the empty prompt, and each image's caption index."""
    from ..models.clip import tokenize

    means, stds = _encode_latents(vae, images, chunk)
    unique = sorted(set(captions))
    ids = tokenize(tokenizer, unique + [""])
    states = np.asarray(text_encoder(ids).last_hidden_state, np.float32)
    lookup = {c: i for i, c in enumerate(unique)}
    return {"means": means, "stds": stds, "states": states[:-1], "empty": states[-1],
            "index": np.asarray([lookup[c] for c in captions], np.int32)}


def _encode_latents(vae, images, chunk: int = 8):
    """Posterior means and standard deviations (NCHW float32) of uint8 NHWC images."""
    enc = jax.jit(lambda p, x: vae.apply_encode(p, x))
    means, stds = [], []
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].astype(np.float32) / 127.5 - 1.0
        post = enc(vae.params, jnp.asarray(x.transpose(0, 3, 1, 2)))
        means.append(np.asarray(post.mean, np.float32))
        stds.append(np.asarray(post.std, np.float32))
    return np.concatenate(means), np.concatenate(stds)


def encode_dataset_xl(pipe, images: np.ndarray, captions: list[str], sizes: np.ndarray,
                      resolution: int, chunk: int = 8) -> dict:
    """:func:`encode_dataset` for SDXL (as diffusers' ``train_text_to_image_sdxl``): each
    caption's hidden states from both text encoders (their penultimate layers, joined) and
    its pooled ``text_embeds`` from the second, through the pipeline's own
    ``encode_prompt``, and per image the ``time_ids`` (original height, width, crop top,
    crop left, target height, width) from ``sizes`` (:func:`load_image_folder`)."""
    means, stds = _encode_latents(pipe.vae, images, chunk)
    unique = sorted(set(captions))
    cond = pipe.encode_prompt(unique + [""], guidance_scale=1.0, height=resolution,
                              width=resolution)
    states = np.asarray(cond["encoder_hidden_states"], np.float32)
    pooled = np.asarray(cond["text_embeds"], np.float32)
    lookup = {c: i for i, c in enumerate(unique)}
    sizes = np.asarray(sizes, np.float32).reshape(-1, 4)
    target = np.full((len(sizes), 2), resolution, np.float32)
    return {"means": means, "stds": stds, "states": states[:-1], "empty": states[-1],
            "pooled": pooled[:-1], "empty_pooled": pooled[-1],
            "time_ids": np.concatenate([sizes, target], axis=1),
            "index": np.asarray([lookup[c] for c in captions], np.int32)}


def cached_encoding(cache_file, compute) -> dict:
    """The arrays in ``cache_file`` (an ``.npz`` read without pickle) or ``compute()``'s,
    then saved there."""
    import zipfile

    from ..io import atomic_write

    cache_file = Path(cache_file)
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            if {"means", "stds", "states", "empty", "index"} <= set(data):
                return data
            why = "arrays are missing"
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
            why = f"{type(e).__name__}: {str(e)[:80]}"
        print(f"the encoding cache {cache_file} is damaged ({why}): encoding again")
    data = compute()
    if is_writer():
        atomic_write(cache_file, lambda f: np.savez(f, **data))
    return data


def batches(data: dict, batch_size: int, seed: int, step: int) -> dict:
    """The batch of one step (a pure function of the seed and the step, so a resumed run
    sees the same batches): examples drawn from a per-epoch permutation."""
    n = len(data["means"])
    per_epoch = max(n // batch_size, 1) if n >= batch_size else 1
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n >= batch_size:
        idx = perm[pos * batch_size:(pos + 1) * batch_size]
    else:
        idx = np.resize(perm, batch_size)
    batch = {"latents": data["means"][idx], "latents_std": data["stds"][idx],
             "encoder_hidden_states": data["states"][data["index"][idx]]}
    if "pooled" in data:  # SDXL
        batch["added_cond_kwargs"] = {"text_embeds": data["pooled"][data["index"][idx]],
                                      "time_ids": data["time_ids"][idx]}
    return batch
