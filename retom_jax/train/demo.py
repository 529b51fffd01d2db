"""Train the demo model (``retom-jax train --demo``; the weights in ``retom_jax/assets/demo``
were made by this script).

1. Data: ``retom_jax.shapes.make_dataset`` (64x64 images, one coloured shape each).
2. Text encoder: the small CLIP of ``demo.DEMO_TEXT``, trained briefly to tell what a
   caption asks for: linear heads on its output states at the end-of-text positions
   (where causal attention has seen the whole caption) classify the shape's colour, the
   shape and the background colour (cross-entropy, every caption of the data set), then
   the heads are dropped and the encoder frozen. (Left at its random initialisation,
   "a red square on a black background" and "a black square on a red background" gave
   nearly the same states: the UNet drew the right two colours in swapped places.) The
   states of the distinct captions (and of the empty prompt) are then computed once.
3. VAE: ``demo.DEMO_VAE`` trained from scratch on reconstruction (mean squared error of
   the posterior mean's decoding) plus a small KL term; the latents' scaling factor is
   then set to one over their standard deviation (the VAE trains on 32x32 crops: it is
   convolutional, and crops cost a quarter of whole images), as Stable Diffusion's was.
4. UNet: ``demo.DEMO_UNET`` trained from scratch with ``retom_jax.train.Trainer`` (full
   training, v-prediction, 10% of captions dropped for classifier-free guidance) on the
   cached latents. (With epsilon prediction the text barely mattered after a few hundred
   steps: at high noise, where only the caption tells the colours, the epsilon loss
   weighs the error of the predicted image by the tiny signal-to-noise ratio; the
   v-prediction loss does not.)
5. Everything is written as a diffusers pipeline folder (float16 weights) with the loss
   curves (``loss.png``) and a log (``train_log.json``); its ``model_index.json`` carries
   the default guidance scale (``demo.DEMO_GUIDANCE``: SD's 7.5 oversaturates a model
   this small).

Checkpoints (in ``--work``) let an interrupted run resume where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import demo, shapes
from ..pipelines.save import save_params, save_unet
from ..progress import Progress
from .trainer import init_module, TrainConfig, Trainer, TrainState, make_optimizer
from .checkpoints import fingerprint, latest_checkpoint, load_checkpoint, plot_losses, save_checkpoint
from .loop import run_steps

DEFAULTS = dict(images=4096, text_steps=200, vae_steps=300, unet_steps=6000, batch=12,
                text_lr=3e-3, vae_lr=2e-3, vae_crop=32, unet_lr=2e-3, kl_weight=1e-5, seed=0)


def _log(msg):
    print(msg, flush=True)


def _resume(ckpts, state, tag, name):
    """``(state, losses)`` from the newest checkpoint in ``ckpts`` (made for ``tag``), or
    the fresh ``state`` and no losses."""
    last = latest_checkpoint(ckpts)
    if last is None:
        return state, []
    state, extra = load_checkpoint(last, state, tag)
    _log(f"{name}: resumed from {last}")
    return state, extra.get("losses", [])


def text_encoder_config() -> dict:
    vocab, _ = demo.bpe_vocab(demo.DEMO_WORDS)
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": len(vocab), "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "eos_token_id": eos, "bos_token_id": bos, "pad_token_id": eos,
            "projection_dim": 512, **demo.DEMO_TEXT}


def build_text_encoder(seed: int):
    from ..models.clip import TextEncoder, TextEncoderConfig
    from ..models.clip import build_text_encoder as build
    from ..models.weights import random_params

    config = TextEncoderConfig.from_dict(text_encoder_config())
    graphdef, params = random_params(lambda rngs: build(config, rngs=rngs), jnp.float32, seed)
    return TextEncoder(config, graphdef, params, dtype=jnp.float32, param_dtype=jnp.float32)


def train_text_encoder(text_encoder, tokenizer, steps: int, lr: float, seed: int):
    """Train ``text_encoder`` (in place) so that its states at the end-of-text positions
    of every demo caption tell the caption's shape colour, shape and background colour
    (a linear head each; cross-entropy, all captions in every step). Returns the losses."""
    import optax

    from ..models.clip import tokenize

    names, captions = list(shapes.COLORS), shapes.all_captions()
    ids = jnp.asarray(tokenize(tokenizer, captions))
    labels = jnp.asarray([(names.index(fg), shapes.SHAPES.index(shape), names.index(bg))
                          for fg, shape, bg in map(shapes.parse_caption, captions)])
    weight = (ids == tokenizer.convert_tokens_to_ids("<|endoftext|>")).astype(jnp.float32)
    weight = weight / weight.sum()
    width = text_encoder.config.hidden_size
    key = jax.random.key(seed + 3)
    sizes = (len(names), len(shapes.SHAPES), len(names))
    heads = [jax.random.normal(k, (width, n)) * 0.01
             for k, n in zip(jax.random.split(key, 3), sizes)]
    params = {"encoder": text_encoder.params, "heads": heads}
    opt = optax.adam(lr)

    def loss_fn(p):
        states = text_encoder.apply(p["encoder"], ids).last_hidden_state
        loss = 0.0
        for i, w in enumerate(p["heads"]):
            logp = jax.nn.log_softmax(states @ w)  # [captions, positions, classes]
            picked = jnp.take_along_axis(logp, labels[:, i, None, None], -1)[..., 0]
            loss = loss - jnp.sum(picked * weight)
        return loss

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = opt.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    opt_state, losses = opt.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    text_encoder.params = params["encoder"]
    _log(f"text: attribute loss {losses[0]:.3f} -> {losses[-1]:.4f} in {steps} steps")
    return losses


def train_vae(images: np.ndarray, work: Path, steps: int, batch: int, lr: float,
              kl_weight: float, seed: int, crop: int):
    """Train ``demo.DEMO_VAE`` on ``images`` (uint8 NHWC); returns (VAE, losses)."""
    from ..models.vae import VAE, AutoencoderKL

    graphdef, params = init_module(lambda rngs: AutoencoderKL(demo.DEMO_VAE, rngs=rngs), seed)
    vae = VAE(demo.DEMO_VAE, graphdef, params, dtype=jnp.float32, param_dtype=jnp.float32)
    config = TrainConfig(steps=steps, batch_size=batch, learning_rate=lr,
                         warmup_steps=min(50, steps // 10), weight_decay=0.0)
    opt = make_optimizer(config)
    size = images.shape[1]
    crop = min(crop, size)
    latent_elems = demo.DEMO_VAE.latent_channels * (crop // demo.DEMO_VAE.vae_scale_factor) ** 2

    def loss_fn(p, x, key):
        post = vae.apply_encode(p, x)
        rec = vae.apply_decode(p, post.mean)  # the posterior's mode: a plain autoencoder
        recon = jnp.mean((rec - x) ** 2)
        kl = jnp.mean(post.kl()) / latent_elems
        return recon + kl_weight * kl, (recon, kl)

    def step(state, x, key):
        import optax

        (loss, (recon, kl)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, x, key)
        upd, o = opt.update(g, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, upd), o), (recon, kl)

    step = jax.jit(step, donate_argnums=(0,))
    state = TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
    tag = fingerprint("demo-vae", demo.DEMO_VAE, config, kl_weight, images.shape, crop)
    ckpts = work / "vae"
    state, losses = _resume(ckpts, state, tag, "vae")
    bar = Progress(steps, int(state.step), "vae ")
    while int(state.step) < steps:
        s = int(state.step)
        rng = np.random.default_rng([seed, 1, s])
        # The VAE is convolutional: it learns on random crops (cheaper than whole images).
        i, (y0, x0) = rng.integers(0, len(images), batch), rng.integers(0, size - crop + 1, 2)
        x = images[i, y0:y0 + crop, x0:x0 + crop].astype(np.float32) / 127.5 - 1.0
        state, (recon, kl) = step(state, jnp.asarray(x.transpose(0, 3, 1, 2)),
                                  jax.random.fold_in(jax.random.key(seed), s))
        losses.append(float(recon))
        bar.update(losses[-1])
        if (s + 1) % 100 == 0 or s + 1 == steps:
            save_checkpoint(ckpts, state, tag, {"losses": losses})
    bar.close()
    vae.params = state.params
    return vae, losses


def encode_images(vae, images: np.ndarray, chunk: int = 256):
    """Posterior means and standard deviations of uint8 NHWC images (NCHW float32)."""
    enc = jax.jit(lambda p, x: vae.apply_encode(p, x))
    means, stds = [], []
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].astype(np.float32) / 127.5 - 1.0
        post = enc(vae.params, jnp.asarray(x.transpose(0, 3, 1, 2)))
        means.append(np.asarray(post.mean))
        stds.append(np.asarray(post.std))
    return np.concatenate(means), np.concatenate(stds)


def train_unet(means, stds, states, index, empty, scaling_factor, work: Path, steps: int,
               batch: int, lr: float, seed: int):
    from ..schedulers import from_config
    from ..models.unet import UNet, UNet2DConditionModel, UNetConfig

    config = UNetConfig.from_dict(demo.DEMO_UNET)
    graphdef, params = init_module(lambda rngs: UNet2DConditionModel(config, rngs=rngs), seed)
    unet = UNet(config, graphdef, params, jnp.float32)
    tc = TrainConfig(steps=steps, batch_size=batch, learning_rate=lr,
                     warmup_steps=min(100, steps // 10), caption_dropout=0.1, seed=seed)
    ac = from_config(demo.DEMO_SCHEDULER).alphas_cumprod()
    trainer = Trainer(unet, ac, tc, scaling_factor=scaling_factor, empty_hidden_states=empty,
                      prediction_type=demo.DEMO_SCHEDULER["prediction_type"])
    state = trainer.init()
    tag = fingerprint("demo-unet", config, tc, means.shape, float(scaling_factor))
    ckpts = work / "unet"
    state, losses = _resume(ckpts, state, tag, "unet")

    def batch_at(s):
        idx = np.random.default_rng([seed, 2, s]).integers(0, len(means), batch)
        return {"latents": means[idx], "encoder_hidden_states": states[index[idx]]}

    state, _ = run_steps(trainer, state, steps, batch_at, jax.random.key(seed + 2), losses,
                         progress="unet", every=250,
                         save=lambda st: save_checkpoint(ckpts, st, tag, {"losses": losses}))
    return state.params, losses


def write_pipeline(out: Path, unet_params, vae, text_encoder, scaling_factor: float,
                   dtype=np.float16):
    out.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False,
             "_retom_jax_guidance_scale": demo.DEMO_GUIDANCE}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(demo.DEMO_SCHEDULER, indent=2) + "\n")
    save_unet(out / "unet", demo.DEMO_UNET, unet_params, dtype)
    vae_config = {"_class_name": "AutoencoderKL", **dataclasses.asdict(demo.DEMO_VAE),
                  "scaling_factor": float(scaling_factor)}
    (out / "vae").mkdir(exist_ok=True)
    (out / "vae" / "config.json").write_text(json.dumps(vae_config, indent=2) + "\n")
    save_params(vae.params, out / "vae", "diffusion_pytorch_model", dtype)
    (out / "text_encoder").mkdir(exist_ok=True)
    (out / "text_encoder" / "config.json").write_text(
        json.dumps(text_encoder_config(), indent=2) + "\n")
    save_params(text_encoder.params, out / "text_encoder", "model", dtype)
    demo.demo_tokenizer(words=demo.DEMO_WORDS).save_pretrained(str(out / "tokenizer"))


def train_demo(out, work=None, *, images: int = DEFAULTS["images"],
               text_steps: int = DEFAULTS["text_steps"], vae_steps: int = DEFAULTS["vae_steps"],
               unet_steps: int = DEFAULTS["unet_steps"],
               batch: int = DEFAULTS["batch"], seed: int = DEFAULTS["seed"],
               keep_work: bool = False) -> Path:
    """Train the whole demo model and write it to ``out``; returns ``out``."""
    from ..models.clip import tokenize

    out = Path(out)
    work = Path(work) if work is not None else out / "checkpoints"
    t_start = time.perf_counter()
    data, captions = shapes.make_dataset(images, demo.DEMO_VAE.sample_size, seed)
    _log(f"data: {len(data)} images of {data.shape[1]}x{data.shape[2]}, "
         f"{len(set(captions))} distinct captions")

    text_encoder = build_text_encoder(seed)
    tokenizer = demo.demo_tokenizer(words=demo.DEMO_WORDS)
    text_losses = train_text_encoder(text_encoder, tokenizer, text_steps, DEFAULTS["text_lr"],
                                     seed)
    unique = sorted(set(captions))
    ids = tokenize(tokenizer, unique + [""])
    states = np.asarray(text_encoder(ids).last_hidden_state, np.float32)
    states, empty = states[:-1], states[-1]
    index = np.asarray([unique.index(c) for c in captions])

    t0 = time.perf_counter()
    vae, vae_losses = train_vae(data, work, vae_steps, batch, DEFAULTS["vae_lr"],
                                DEFAULTS["kl_weight"], seed, DEFAULTS["vae_crop"])
    vae_seconds = time.perf_counter() - t0
    means, stds = encode_images(vae, data)
    sample = means
    scaling_factor = float(1.0 / sample.std())
    _log(f"vae: reconstruction mse {np.mean(vae_losses[-50:]):.5f}; latents std "
         f"{sample.std():.3f} -> scaling_factor {scaling_factor:.4f}")

    t0 = time.perf_counter()
    unet_params, unet_losses = train_unet(means, stds, states, index, empty, scaling_factor,
                                             work, unet_steps, batch, DEFAULTS["unet_lr"], seed)
    unet_seconds = time.perf_counter() - t0

    write_pipeline(out, unet_params, vae, text_encoder, scaling_factor)
    plot_losses(out / "loss.png", {"unet (v-prediction mse)": unet_losses,
                                   "vae (reconstruction mse)": vae_losses},
                title="demo model: training losses")
    log = {"command": "retom-jax train --demo", "images": images, "batch": batch,
           "text_steps": text_steps, "vae_steps": vae_steps, "unet_steps": unet_steps,
           "seed": seed,
           "scaling_factor": scaling_factor,
           "text_final_loss": text_losses[-1],
           "vae_final_mse": float(np.mean(vae_losses[-50:])),
           "unet_final_loss": float(np.mean(unet_losses[-100:])),
           "vae_seconds_this_run": round(vae_seconds, 1),
           "unet_seconds_this_run": round(unet_seconds, 1),
           "total_seconds_this_run": round(time.perf_counter() - t_start, 1),
           "jax": jax.__version__, "devices": str(jax.devices()),
           "text_losses": [round(x, 6) for x in text_losses],
           "vae_losses": [round(x, 6) for x in vae_losses],
           "unet_losses": [round(x, 6) for x in unet_losses]}
    (out / "train_log.json").write_text(json.dumps(log) + "\n")
    if not keep_work and work.is_dir() and work != out:
        shutil.rmtree(work)
    _log(f"wrote the demo model to {out} in {time.perf_counter() - t_start:.0f} s")
    return out


def main(argv=None):  # pragma: no cover - the CLI's `train --demo` is the entry point
    import argparse

    p = argparse.ArgumentParser(description="train the demo model")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None)
    for k in ("images", "text_steps", "vae_steps", "unet_steps", "batch", "seed"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=DEFAULTS[k])
    a = p.parse_args(argv)
    train_demo(a.out, a.work, images=a.images, text_steps=a.text_steps, vae_steps=a.vae_steps,
               unet_steps=a.unet_steps, batch=a.batch, seed=a.seed,
               keep_work=a.work is not None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
