"""``retom-jax eval``: images from every merging method and ratio from the same seeds, then
CLIP score, CMMD, FID, PSNR and SSIM against the time each image took.

Layout of ``--out DIR``::

    DIR/images/<run>/p0000-s0.png   one image per (prompt, seed); <run> is none, tome-0.5,
                                    retom-0.3, todo ...
    DIR/timings.json                seconds per image (compile excluded) of every image made
    DIR/generation.json             the settings the images are made with (a resumed run
                                    with other settings is an error, never a silent mix)
    DIR/results.json                settings and one row per run
    DIR/results.md                  the same rows as a markdown table
    DIR/results.png                 each metric against seconds per image (needs matplotlib)

Images already in ``DIR/images`` are not made again, so an interrupted run resumes where
it stopped; the metrics are always recomputed from all images. The unmerged run ("none")
is always made: PSNR and SSIM compare every other run with it image by image, and without
``--reference`` FID and CMMD compare every other run with its images too.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..cli.options import merge_from_args, step_cache_from_args
from ..pipelines.step_cache import FAST
from ..progress import Progress

METHODS = ("none", "tome", "retom", "todo")
METRIC_FIELDS = ("clip_score", "cmmd", "fid", "psnr", "ssim")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------- parsing

# ----------------------------------------------------------------------------- runs

def run_list(methods, ratios, step_cache=None, fast=False) -> list[tuple[str, float | None]]:
    """``[(method, ratio)]``; with ``step_cache``, each run again as ``method+cache`` (the
    unmerged one too) with that step cache; ``fast`` adds the --fast preset's run."""
    runs = [("none", None)]
    for m in methods:
        if m in ("tome", "retom"):
            runs += [(m, r) for r in ratios]
        elif m == "todo":
            runs.append(("todo", None))
    if step_cache is not None:
        runs += [(m + "+cache", r) for m, r in runs]
    if fast:
        runs.append(("fast", None))
    return runs


def run_settings(args, method: str, ratio, first_level: int):
    """``(merge, step_cache)`` of a run of :func:`run_list`."""
    if method == "fast":
        return FAST.merge(first_level), FAST.step_cache
    base = method.removesuffix("+cache")
    cache = step_cache_from_args(args) if method.endswith("+cache") else None
    return merge_from_args(args, first_level, base, ratio), cache


def run_tag(method: str, ratio) -> str:
    return method if ratio is None else f"{method}-{ratio:g}"


def _load_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return default


def write_json(path: Path, value):
    from ..io import write_json as write

    write(path, value)


_GENERATION_KEYS = ("model", "steps", "guidance", "height", "width", "scheduler", "dtype",
                    "window", "matching", "cache_step", "max_downsample", "todo_factor",
                    "step_cache", "step_cache_depth")


def check_generation(args, prompts, out: Path) -> dict:
    """The settings the images in ``out`` are made with; ValueError when ``out`` already
    holds images made with other settings (resuming would mix them silently). More
    prompts (a longer list with the same start) or more seeds are fine."""
    settings = json.loads(json.dumps({k: getattr(args, k) for k in _GENERATION_KEYS}))
    settings["prompts"] = list(prompts)
    old = _load_json(out / "generation.json", None)
    if old is None:
        return settings
    changed = [k for k in _GENERATION_KEYS if old.get(k) != settings[k]]
    short, long = sorted((old.get("prompts", []), settings["prompts"]), key=len)
    if long[:len(short)] != short:
        changed.append("prompts")
    if changed:
        diff = ", ".join(f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in changed
                         if k != "prompts") or "a different prompt list"
        raise ValueError(f"{out} holds images made with other settings ({diff}): use another "
                         f"--out, or remove {out / 'images'} to start again")
    if len(settings["prompts"]) < len(old.get("prompts", [])):
        raise ValueError(f"{out} holds images of {len(old['prompts'])} prompts and this run "
                         f"names {len(settings['prompts'])}: its results would replace theirs; "
                         f"use --num-prompts {len(old['prompts'])} (or more) or another --out")
    settings["prompts"] = long
    return settings


def _usable(path: Path, size, log) -> bool:
    """Whether an image of an earlier run can be kept: it exists, is a whole PNG and has
    the size asked for; a damaged one is reported and made again."""
    from ..images import ImageFileError, check_image_file

    if not path.is_file():
        return False
    try:
        got = check_image_file(path)
    except ImageFileError as e:
        log(f"{e}: making it again")
        return False
    if None not in size and tuple(got) != tuple(size):
        log(f"{path} is {got[0]}x{got[1]}, not {size[0]}x{size[1]}: making it again")
        return False
    return True


def generate_images(pipe, args, prompts, runs, out: Path, log=print) -> dict:
    """Make the missing images; returns ``{run tag: [seconds per image, ...]}``."""
    from ..io import save_image

    write_json(out / "generation.json", check_generation(args, prompts, out))
    first_level = min(pipe.unet.config.attention_downsamples(), default=1)
    timings_path = out / "timings.json"
    timings = _load_json(timings_path, {})
    todo = []
    for method, ratio in runs:
        tag = run_tag(method, ratio)
        folder = out / "images" / tag
        for p in range(len(prompts)):
            for seed in range(args.seeds):
                path = folder / f"p{p:04d}-s{seed}.png"
                if not _usable(path, (args.width, args.height), log):
                    todo.append((method, ratio, tag, p, seed, path))
    total = len(runs) * len(prompts) * args.seeds
    log(f"{total - len(todo)} of {total} images already in {out / 'images'}; "
        f"{len(todo)} to make")
    bar = Progress(len(todo), every=0, unit="") if todo else None
    settings = {}
    for method, ratio, tag, p, seed, path in todo:
        if tag not in settings:
            settings[tag] = run_settings(args, method, ratio, first_level)
        merge, step_cache = settings[tag]
        result = pipe(prompts[p], num_inference_steps=args.steps,
                      guidance_scale=args.guidance, height=args.height, width=args.width,
                      seed=seed, merge=merge, step_cache=step_cache, output_type="pil")
        save_image(result.images[0], path)
        timings.setdefault(tag, {})[path.name] = result.run_seconds
        write_json(timings_path, timings)
        bar.update(what=f"{tag} {path.stem}")
    if bar is not None:
        bar.close()
    return timings


# ----------------------------------------------------------------------------- metrics

def _read_images(paths, size=None) -> "np.ndarray":
    """uint8 ``[N, H, W, 3]``; with ``size`` ``(h, w)``, an image of another size is
    resized (shortest side, bicubic) and centre-cropped to it first."""
    import numpy as np
    from PIL import Image

    from ..images import read_image

    out = []
    for p in paths:
        im = read_image(p)
        if size is not None and im.size != (size[1], size[0]):
            h, w = size
            scale = max(h / im.height, w / im.width)
            rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
            im = im.resize((rw, rh), Image.BICUBIC)
            left, top = (rw - w) // 2, (rh - h) // 2
            im = im.crop((left, top, left + w, top + h))
        out.append(np.asarray(im))
    return np.stack(out)


def reference_paths(folder: str, check: bool = False) -> list[Path]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"--reference {folder!r}: no such folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise ValueError(f"--reference {folder!r} holds {len(paths)} image(s); FID and "
                         f"CMMD need at least 2")
    if check:
        from ..images import check_image_file

        for p in paths:
            check_image_file(p, "--reference image")
    return paths


def _padded(fn, batch, batch_size):
    """``fn`` on a batch padded to ``batch_size`` rows (one compiled shape), unpadded."""
    import numpy as np

    n = len(batch)
    if n < batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, 0)])
    return np.asarray(fn(batch))[:n]


def measure(args, prompts, runs, out: Path, timings: dict, clip=None, inception=None,
            log=print) -> list[dict]:
    """One row per run with the metrics whose model is given. Images are read from disk
    one batch at a time (every metric of a batch in one pass), so memory does not grow
    with the number of images."""
    import numpy as np

    from .clip_vision import clip_scores
    from .metrics import cmmd_embeddings, fid, mmd, psnr, ssim

    names = [f"p{p:04d}-s{s}.png" for p in range(len(prompts)) for s in range(args.seeds)]
    per_image_prompts = [prompts[p] for p in range(len(prompts)) for _ in range(args.seeds)]
    bs = args.batch_size
    base_paths = [out / "images" / "none" / n for n in names]
    size = _read_images(base_paths[:1]).shape[1:3]
    with_text = clip is not None and clip.text is not None and clip.tokenizer is not None

    def features(paths, fit=False, want_text=False, against=None):
        """Per-image CLIP scores, CMMD embeddings, Inception features, PSNR and SSIM."""
        acc = {k: [] for k in ("clip", "cmmd", "fid", "psnr", "ssim")}
        for i in range(0, len(paths), bs):
            batch = _read_images(paths[i:i + bs], size if fit else None)
            if want_text:
                acc["clip"].append(clip_scores(clip, list(batch), per_image_prompts[i:i + bs], bs))
            if clip is not None:
                acc["cmmd"].append(cmmd_embeddings(clip, batch, bs))
            if inception is not None:
                acc["fid"].append(_padded(lambda b: inception(b.astype(np.float32) / 255.0),
                                          batch, bs))
            if against is not None:
                pair = np.stack([_read_images(against[i:i + bs]), batch], 1)
                pair = pair.astype(np.float32) / 255.0
                acc["psnr"].append(_padded(lambda x: psnr(x[:, 0], x[:, 1]), pair, bs))
                acc["ssim"].append(_padded(lambda x: ssim(x[:, 0], x[:, 1]), pair, bs))
        return {k: np.concatenate(v) for k, v in acc.items() if v}

    reference = None
    if args.reference and (clip is not None or inception is not None):
        reference = features(reference_paths(args.reference), fit=True)
    rows = []
    for method, ratio in runs:
        tag = run_tag(method, ratio)
        paths = [out / "images" / tag / n for n in names]
        got = features(paths, want_text=with_text,
                       against=None if tag == "none" else base_paths)
        if tag == "none" and reference is None:
            reference = got  # without --reference, the unmerged images are the reference
        row = {"method": method, "ratio": ratio, "run": tag, "images": len(paths)}
        compare = tag != "none" or args.reference is not None
        if "clip" in got:
            row["clip_score"] = max(float(np.mean(got["clip"])), 0.0)
        if "cmmd" in got and compare:
            row["cmmd"] = float(mmd(got["cmmd"], reference["cmmd"]))
        if "fid" in got and compare:
            row["fid"] = fid(got["fid"], reference["fid"])
        if "psnr" in got:
            row["psnr"] = float(np.mean(got["psnr"]))
            row["ssim"] = float(np.mean(got["ssim"]))
        seconds = list(timings.get(tag, {}).values())
        if seconds:
            row["seconds_per_image"] = float(np.median(seconds))
        rows.append(row)
        log(f"measured {tag}: " + ", ".join(f"{k} {row[k]:.4g}" for k in METRIC_FIELDS
                                            if k in row))
    return rows


# ----------------------------------------------------------------------------- reports

def markdown_table(rows: list[dict]) -> str:
    fields = [f for f in METRIC_FIELDS + ("seconds_per_image",) if any(f in r for r in rows)]
    head = ["method", "ratio"] + fields
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], "-" if r["ratio"] is None else f"{r['ratio']:g}"]
        cells += [f"{r[f]:.4g}" if f in r else "-" for f in fields]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    """Each metric against seconds per image; False (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot was drawn (pip install matplotlib, "
              "or pip install 'retom-jax[bench]'); results.json and results.md are written")
        return False
    fields = [f for f in METRIC_FIELDS if any(f in r and "seconds_per_image" in r for r in rows)]
    if not fields:
        return False
    fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.5), squeeze=False)
    for ax, field in zip(axes[0], fields):
        for r in rows:
            if field in r and "seconds_per_image" in r:
                ax.scatter(r["seconds_per_image"], r[field])
                ax.annotate(r["run"], (r["seconds_per_image"], r[field]), fontsize=8,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("seconds per image")
        ax.set_ylabel(field)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    from ..io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- command
