"""Training files: LoRA files, checkpoints (resumable), loss plots.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..models import weights
from ..pipelines.save import host_copy, is_writer, write_safetensors
from .trainer import LORA_TARGETS, TrainError


# --------------------------------------------------------------------------- files

def lora_state_dict(lora: dict, prefix: str = "unet", dtype=np.float32) -> dict:
    """Adapters in diffusers' peft layout: ``{prefix}.{module}.lora_A.weight`` (rank, in)
    and ``.lora_B.weight`` (out, rank)."""
    out = {}
    for name, a in lora.items():
        out[f"{prefix}.{name}.lora_A.weight"] = np.asarray(a["down"], np.float32).T.astype(dtype)
        out[f"{prefix}.{name}.lora_B.weight"] = np.asarray(a["up"], np.float32).T.astype(dtype)
    return out


def save_lora(path, lora: dict, rank: int, alpha: float | None = None,
              dtype=np.float32) -> Path:
    """Write the adapters as a diffusers LoRA file (``pytorch_lora_weights.safetensors``
    when ``path`` is not a ``.safetensors`` file name), as diffusers' ``save_lora_weights``
    does: peft keys under ``unet.`` and the adapter config (``r``, ``lora_alpha``,
    ``target_modules``) in the ``lora_adapter_metadata`` header entry, from which
    ``load_lora_weights`` (and ``retom_jax.lora.read_lora`` / ``pipe.load_lora``) take the
    scale ``alpha / r``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    tensors = lora_state_dict(lora, dtype=dtype)
    weights.check_finite(tensors, f"the trained LoRA (not written to {path}; a lower "
                         f"learning rate may help)", TrainError)
    config = {"unet.r": int(rank), "unet.lora_alpha": float(alpha or rank),
              "unet.target_modules": sorted({t for n in lora for t in LORA_TARGETS
                                             if n.endswith("." + t)})}
    return write_safetensors(path, tensors,
                             {"format": "pt", "lora_adapter_metadata": json.dumps(
                                 config, indent=2, sort_keys=True)})


# --------------------------------------------------------------------------- checkpoints

def fingerprint(*parts) -> str:
    """A short hash naming what a checkpoint belongs to (model structure, training kind)."""
    return hashlib.sha256(json.dumps([repr(p) for p in parts]).encode()).hexdigest()[:16]


def tree_shapes(tree) -> list:
    return [(jax.tree_util.keystr(p), tuple(np.shape(a)), str(np.asarray(a).dtype)
             if not hasattr(a, "dtype") else str(a.dtype))
            for p, a in jax.tree_util.tree_leaves_with_path(tree)]


def save_checkpoint(folder, state, tag: str, extra: dict | None = None, keep: int = 2) -> Path:
    """Save a training state (any pytree holding ``step``) as
    ``folder/step_{step:06d}.safetensors``; ``tag`` (see :func:`fingerprint`) is checked
    when resuming. Only the newest ``keep`` checkpoints are kept."""
    folder = Path(folder)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    tensors = {f"{i:05d}{jax.tree_util.keystr(p)}": host_copy(a)
               for i, (p, a) in enumerate(leaves)}
    step = int(host_copy(state.step))
    meta = {"retom_jax_checkpoint": "1", "tag": tag, "step": str(step),
            "extra": json.dumps(extra or {})}
    path = write_safetensors(folder / f"step_{step:06d}.safetensors", tensors, meta)
    for old in sorted(folder.glob("step_*.safetensors"))[:-keep] if is_writer() else ():
        old.unlink()
    return path


def latest_checkpoint(folder) -> Path | None:
    found = sorted(Path(folder).glob("step_*.safetensors")) if Path(folder).is_dir() else []
    return found[-1] if found else None


def checkpoint_info(path) -> tuple[int, dict]:
    """``(step, extra)`` of a checkpoint, from its header only (no arrays read)."""
    path = Path(path)
    try:
        meta = weights.read_safetensors_metadata(path)
        if meta.get("retom_jax_checkpoint") != "1":
            raise TrainError(f"{path} is not a retom-jax training checkpoint")
        return int(meta.get("step", "0")), json.loads(meta.get("extra", "{}"))
    except weights.CheckpointError as e:
        raise TrainError(str(e)) from None
    except (ValueError, TypeError) as e:
        if isinstance(e, TrainError):
            raise
        raise TrainError(f"{path} has a malformed checkpoint header ({e})") from None


# The options that define a training run: a resume that changes one is refused (one line
# naming it) unless asked for (--allow-changes); steps may grow (the schedule is computed
# for the new count), checkpointing and progress are not part of the run.
RUN_SETTINGS = ("data", "resolution", "caption_column", "batch_size", "learning_rate",
                "warmup_steps", "snr_gamma", "prediction_type", "max_grad_norm",
                "weight_decay", "caption_dropout", "lora_alpha", "seed", "dtype", "merge")


def changed_settings(saved: dict, current: dict) -> list[str]:
    """``"name old -> new"`` for each run setting recorded in ``saved`` that differs."""
    return [("data (its images or captions changed)" if k == "data" else
             f"{k} {saved[k]!r} -> {current[k]!r}") for k in RUN_SETTINGS
            if k in saved and k in current and saved[k] != current[k]]


def load_checkpoint(path, template, tag: str):
    """``(state, extra)`` from a checkpoint written by :func:`save_checkpoint` for a state
    shaped like ``template``; TrainError (one line) if it was made for another model or
    training setup, or is not a checkpoint."""
    path = Path(path)
    try:
        meta = weights.read_safetensors_metadata(path)
    except weights.CheckpointError as e:
        raise TrainError(str(e)) from None
    if meta.get("retom_jax_checkpoint") != "1":
        raise TrainError(f"{path} is not a retom-jax training checkpoint")
    if meta.get("tag") != tag:
        raise TrainError(f"checkpoint {path} was made for another model or training setup "
                         f"(its tag {meta.get('tag')} != {tag}): use another --out folder "
                         f"or delete the checkpoint")
    stored = weights.read_safetensors(path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [f"{i:05d}{jax.tree_util.keystr(p)}" for i, (p, _) in enumerate(leaves)]
    if sorted(names) != sorted(stored):
        raise TrainError(f"checkpoint {path} does not match this training state "
                         f"({len(stored)} arrays stored, {len(names)} expected)")
    values = []
    for name, (_, ref) in zip(names, leaves):
        a = stored[name]
        if tuple(a.shape) != tuple(np.shape(ref)):
            raise TrainError(f"checkpoint {path}: {name} has shape {list(a.shape)}, "
                             f"expected {list(np.shape(ref))}")
        values.append(jnp.asarray(np.array(a), dtype=getattr(ref, "dtype", None)))
    weights.check_finite(dict(zip(names, values)), f"checkpoint {path}: its arrays (delete it "
                         f"to resume from the one before, or use another --out)", TrainError)
    return jax.tree_util.tree_unflatten(treedef, values), json.loads(meta.get("extra", "{}"))


# --------------------------------------------------------------------------- plots

def smooth(values, window: int = 25) -> np.ndarray:
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return v
    w = max(1, min(window, len(v) // 5 or 1))
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = (c[w:] - c[:-w]) / w
    return np.concatenate([v[: w - 1].cumsum() / np.arange(1, w), out])


def plot_losses(path, curves: dict, title: str = "training loss", size=(640, 400)) -> Path:
    """A loss-curve PNG drawn with Pillow (no plotting library needed): each curve
    ``{name: [loss per step]}`` raw (light) and smoothed (dark), log-scale y axis."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    series = {k: np.asarray(v, np.float64) for k, v in curves.items() if len(v)}
    allv = np.concatenate([v[(v > 0) & np.isfinite(v)] for v in series.values()] + [[]])
    allv = allv if allv.size else np.ones(1)
    lo, hi = np.log10(allv.min()), np.log10(allv.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(v) for v in series.values()) if series else 1

    def xy(i, v):
        x = left + (w - left - right) * i / max(n - 1, 1)
        y = top + (h - top - bottom) * (hi - np.log10(max(v, 10 ** lo))) / (hi - lo)
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for e in range(int(np.floor(lo)), int(np.ceil(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if 10 ** lo <= v <= 10 ** hi:
                y = xy(0, v)[1]
                d.line([left, y, w - right, y], fill=(225, 225, 225))
                d.text((4, y - 6), f"{v:g}", fill="black")
    for k in range(5):
        i = (n - 1) * k / 4
        d.text((xy(i, 1)[0] - 10, h - bottom + 6), f"{int(i)}", fill="black")
    d.text((w // 2 - 15, h - 18), "step", fill="black")
    d.text((left, 8), title, fill="black")
    palette = [((150, 180, 230), (20, 60, 160)), ((240, 170, 150), (180, 40, 20)),
               ((160, 220, 160), (20, 120, 40))]
    for c, (name, v) in enumerate(series.items()):
        light, dark = palette[c % len(palette)]
        if len(v) > 1:
            d.line([xy(i, x) for i, x in enumerate(v)], fill=light)
            d.line([xy(i, x) for i, x in enumerate(smooth(v))], fill=dark, width=2)
        d.text((w - right - 150, top + 6 + 14 * c), f"{name}: {smooth(v)[-1]:.4g}", fill=dark)
    from ..io import save_image

    return save_image(img, path)
