"""The training run: ``train(model, data, out, ...)`` and the step loop it shares
with the demo recipe.
"""
from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..models import weights
from ..progress import Progress
from ..pipelines.save import host_copy, is_writer, save_unet
from ..io import write_json
from .checkpoints import (changed_settings, checkpoint_info, fingerprint, latest_checkpoint,
                          load_checkpoint, plot_losses, save_checkpoint, save_lora, tree_shapes)
from .data import batches, cached_encoding, data_fingerprint, encode_dataset, encode_dataset_xl, load_image_folder, read_metadata
from .trainer import TrainConfig, TrainError, TrainState, Trainer


# --------------------------------------------------------------------------- the run

def run_steps(trainer: Trainer, state: TrainState, steps: int, batch_at, key, losses: list,
              *, progress: str | None = None, every: int | None = None, save=None):
    """Run ``trainer.step`` from the state's step up to ``steps`` (the batch of step ``s``
    is ``batch_at(s)``), appending each step's loss to ``losses``; ``progress``: the
    label of a progress line (None: none). The host does not wait
    for a step before dispatching the next: the step counter lives in Python and a step's
    loss is read once the following step is queued. ``save(state)`` runs every ``every``
    steps and after the last (its losses are in ``losses`` by then). Returns ``(state,
    {"compile_seconds", "steps_per_second"})`` (the first call's time, tracing and
    compiling included; the rate of the steps after it)."""
    frozen = trainer.frozen()
    first, pending = int(state.step), None
    bar = Progress(steps, first, progress) if progress is not None else None
    compile_seconds, t_loop = None, time.perf_counter()

    def record(loss):
        losses.append(float(loss))
        if bar is not None:
            bar.update(losses[-1])

    for s in range(first, steps):
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, batch_at(s), key, frozen)
        if compile_seconds is None:
            compile_seconds, t_loop = time.perf_counter() - t0, time.perf_counter()
        if pending is not None:
            record(pending)
        pending = metrics["loss"]
        if every and ((s + 1) % every == 0 or s + 1 == steps):
            record(pending)
            pending = None
            if save is not None:
                save(state)
    if pending is not None:
        record(pending)
    jax.block_until_ready(state)
    if bar is not None:
        bar.close()
    done = steps - first
    rate = (done - 1) / max(time.perf_counter() - t_loop, 1e-9) if done > 1 else None
    return state, {"compile_seconds": compile_seconds, "steps_per_second": rate}


def check_out_folder(out: Path, data, overwrite: bool = False) -> None:
    """TrainError unless ``out`` can be the output folder of a run on ``data``: not a file
    (nor under one), not ``data`` or inside it (the outputs would become training images),
    and, without ``overwrite``, not holding a finished result without checkpoints to
    resume (another run's files)."""
    out, data = Path(out), Path(data)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise TrainError(f"--out {str(out)!r}: {str(probe)!r} is a file; name a folder")
    o, d = out.resolve(), data.resolve()
    if o == d or d in o.parents:
        raise TrainError(f"--out {str(out)!r} is inside --data {str(data)!r}: its files "
                         f"would become training images; name a folder outside the data")
    finished = [n for n in ("train_log.json", "pytorch_lora_weights.safetensors", "unet")
                if (out / n).exists()]
    if finished and latest_checkpoint(out / "checkpoints") is None and not overwrite:
        raise TrainError(f"--out {str(out)!r} holds a finished run ({', '.join(finished)}) "
                         f"and no checkpoint to resume: pass --overwrite to replace it, or "
                         f"name another folder")


def data_stats(data, caption_column: str) -> str:
    """What identifies a data folder's content: names, sizes, times and captions."""
    rows = read_metadata(data, caption_column)
    return fingerprint([(p.name, p.stat().st_size, p.stat().st_mtime_ns, c) for p, c in rows])


def _check_changes(saved: dict, settings: dict, last, allow: bool) -> None:
    changed = changed_settings(saved, settings)
    if changed and not allow:
        raise TrainError(f"the run in {Path(last).parent.parent} was made with other settings "
                         f"({'; '.join(changed)}): use the same ones to resume, another --out "
                         f"to start again, or --allow-changes to go on with these")


def train(model, data, out, *, resolution: int = 512, lora_rank: int | None = None,
          lora_alpha: float | None = None, steps: int = 1000, batch_size: int = 1,
          learning_rate: float = 1e-4, warmup_steps: int = 0, snr_gamma: float | None = None,
          prediction_type: str | None = None, merge=None, dtype="float32",
          master_fp32: bool = False, max_grad_norm: float | None = 1.0,
          weight_decay: float = 1e-2, caption_dropout: float = 0.0,
          checkpoint_every: int = 500, caption_column: str = "text", seed: int = 0,
          save_dtype="float32", progress: bool = True, log=print, mesh=None,
          allow_changes: bool = False, overwrite: bool = False) -> dict:
    """Fine-tune the UNet of the SD 1.x/2.x or SDXL pipeline ``model`` on the image folder
    ``data`` and write the result to ``out``: ``pytorch_lora_weights.safetensors`` (LoRA) or a
    diffusers ``unet/`` folder (full), ``loss.png``, ``train_log.json``; checkpoints in
    ``out/checkpoints`` every ``checkpoint_every`` steps, from which a rerun with the same
    ``out`` resumes. ``merge``: a merge config, or a function of the UNet's first attention
    level (downsample factor) returning one. ``mesh`` (``make_mesh(data=, fsdp=)``): the
    batch is split over ``data`` and ``fsdp`` (``batch_size`` a multiple of their
    product), the model, the trained parameters and the optimizer state over ``fsdp`` by
    the sharding rules. Every input is checked before anything is compiled.

    A rerun resumes the run whose checkpoints ``out`` holds: the settings that define it
    (`RUN_SETTINGS`: the data, learning rate, merge ...) must be the same unless
    ``allow_changes``, and ``steps`` must be above the checkpoint's step. ``out`` may not
    be ``data`` or inside it, nor a file; a finished result there without checkpoints is
    replaced only with ``overwrite``."""
    from ..pipelines.stable_diffusion import StableDiffusionXLPipeline
    from ..pipelines.loading import load_pipeline, pipeline_folder
    from ..models.weights import parse_dtype

    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                         warmup_steps=warmup_steps, snr_gamma=snr_gamma,
                         prediction_type=prediction_type, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, master_fp32=master_fp32,
                         max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                         caption_dropout=caption_dropout, seed=seed)
    if not isinstance(resolution, int) or resolution < 8:
        raise TrainError(f"resolution must be an integer >= 8, got {resolution!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise TrainError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    dtype = parse_dtype(dtype)
    save_dtype = np.dtype(parse_dtype(save_dtype))
    if mesh is not None:
        from ..sharding import batch_shards, mesh_shape

        if mesh_shape(mesh)["spatial"] > 1:
            raise TrainError(f"training splits the batch over data and fsdp; the mesh has "
                             f"spatial={mesh.shape['spatial']} (spatial sharding is for "
                             f"sampling): use a mesh without spatial")
        if batch_size % batch_shards(mesh):
            raise TrainError(f"batch size {batch_size} does not divide over the mesh's data x "
                             f"fsdp = {batch_shards(mesh)} devices: use a multiple of "
                             f"{batch_shards(mesh)}")
    read_metadata(data, caption_column)  # the data's errors come before the model is read
    check_out_folder(Path(out), data, overwrite)
    last = latest_checkpoint(Path(out) / "checkpoints")
    settings = {"data": data_stats(data, caption_column), "resolution": resolution,
                "caption_column": caption_column, "batch_size": batch_size,
                "learning_rate": learning_rate, "warmup_steps": warmup_steps,
                "snr_gamma": snr_gamma, "prediction_type": prediction_type,
                "max_grad_norm": max_grad_norm, "weight_decay": weight_decay,
                "caption_dropout": caption_dropout, "lora_alpha": lora_alpha, "seed": seed,
                "dtype": parse_dtype(dtype).name}
    saved = {}
    if last is not None:
        done, extra = checkpoint_info(last)
        if steps <= done:
            raise TrainError(f"the checkpoint {last} is at step {done}: --steps {steps} would "
                             f"train nothing; use --steps above {done} to train on, or another "
                             f"--out to start again")
        saved = extra.get("settings") or {}
        _check_changes(saved, settings, last, allow_changes)
    out = Path(out)
    t_start = time.perf_counter()
    pipe = load_pipeline(model, dtype, mesh=mesh)
    xl = isinstance(pipe, StableDiffusionXLPipeline)
    unet, vae = pipe.unet, pipe.vae
    factor = vae.config.vae_scale_factor
    multiple = factor * 2 ** unet.config.num_upsamplers
    if resolution % multiple:
        raise TrainError(f"resolution {resolution} is not a multiple of {multiple} (the VAE's "
                         f"factor {factor} times the UNet's {2 ** unet.config.num_upsamplers})")
    latent = resolution // factor
    if merge is not None and not hasattr(merge, "applies"):  # a function of the first level
        merge = merge(min(unet.config.attention_downsamples(), default=1))
    if merge is not None:
        unet.check_merge(merge, (latent, latent), key=jax.random.key(0))
    settings["merge"] = repr(merge)
    _check_changes(saved, settings, last, allow_changes)
    tag = fingerprint("unet", unet.config, tree_shapes(unet.params), lora_rank, master_fp32)
    trainer = Trainer(unet, pipe.scheduler.alphas_cumprod(), config, merge=merge,
                      scaling_factor=vae.config.scaling_factor,
                      prediction_type=pipe.scheduler.prediction_type, mesh=mesh,
                      **(dict(latents_mean=vae.config.latents_mean,
                              latents_std=vae.config.latents_std) if xl else {}))
    state = trainer.init(jax.random.key(seed))
    losses: list[float] = []
    ckpts = out / "checkpoints"
    if last is not None:
        state, extra = load_checkpoint(last, state, tag)
        state = trainer.place(state)
        losses = list(extra.get("losses", []))
        log(f"resumed from {last} (step {int(state.step)})")

    def compute():
        images, captions, sizes = load_image_folder(data, resolution, caption_column, True)
        log(f"encoding {len(images)} images ({resolution} px) and {len(set(captions))} "
            f"captions once")
        if xl:  # both text encoders, pooled text_embeds, per-image size time_ids
            return encode_dataset_xl(pipe, images, captions, sizes, resolution)
        return encode_dataset(vae, pipe.text_encoder, pipe.tokenizer, images, captions)

    cache = out / "cache" / (data_fingerprint(data, resolution, caption_column, tag) + ".npz")
    encoded = cached_encoding(cache, compute)
    trainer.empty = jnp.asarray(encoded["empty"])
    if xl:
        trainer.empty_pooled = jnp.asarray(encoded["empty_pooled"])
    kind = f"LoRA rank {lora_rank}" if lora_rank else "full fine-tuning"
    log(f"training the UNet ({kind}, {merge!r} on the forward pass) on "
        f"{len(encoded['means'])} images for {steps} steps")
    state, timing = run_steps(
        trainer, state, steps, lambda s: batches(encoded, batch_size, seed, s),
        jax.random.key(seed), losses, progress="train" if progress else None,
        every=checkpoint_every,
        save=lambda st: save_checkpoint(ckpts, st, tag, {"losses": losses,
                                                          "settings": settings}))
    compile_seconds, rate = timing["compile_seconds"], timing["steps_per_second"]

    if lora_rank:
        result = save_lora(out, jax.tree.map(host_copy, state.params), lora_rank, lora_alpha,
                           save_dtype)
    else:
        raw = weights.read_config(pipeline_folder(model) / "unet")
        unet_params = trainer.unet_params(state.params)
        weights.check_finite(dict(jax.tree_util.tree_leaves_with_path(unet_params)),
                             f"the trained UNet (not written to {out / 'unet'}; a lower "
                             f"learning rate may help)", TrainError)
        result = save_unet(out / "unet", raw, unet_params, save_dtype)
    summary = {"model": str(model), "data": str(data), "resolution": resolution,
               "steps": steps, "batch_size": batch_size, "lora_rank": lora_rank,
               "lora_alpha": lora_alpha, "merge": repr(merge), "dtype": str(dtype.name),
               "learning_rate": learning_rate,
               "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
               "first_loss": losses[0] if losses else None,
               "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])) if losses
               else None, "steps_per_second": rate, "compile_seconds": compile_seconds,
               "seconds": round(time.perf_counter() - t_start, 2), "output": str(result),
               "losses": losses}
    if is_writer():  # process 0 of a multi-host run (the files go to a shared folder)
        plot_losses(out / "loss.png", {"loss": losses}, title=f"retom-jax train: {kind}")
        write_json(out / "train_log.json", summary, indent=None)
        log(f"saved {result}; loss curve {out / 'loss.png'}")
    return summary
