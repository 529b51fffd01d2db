"""Training: one step against diffusers' torch UNet, LoRA files read by diffusers, the loss
falling on a tiny set, the `retom-jax train` command, bad input, and the trained demo.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tomesd
import torch
import torch.nn.functional as F

from retom_jax import ReToM, ToMe, load_unet
from retom_jax import shapes
from retom_jax.models.lora import read_lora
from retom_jax.train.trainer import TrainConfig, Trainer, TrainError, init_lora
from retom_jax.train.checkpoints import save_checkpoint
from retom_jax.pipelines.save import torch_state_dict
from retom_jax.train.loop import train
from tests.pipeline_helpers import SD_SCHEDULER, latents_for, reference, save_sd
from tests.tiny import FAMILIES, torch_unet
from tests.util import check_bound, rel_err


def ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items()
                            if k not in ("set_alpha_to_one", "steps_offset")})


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    model = torch_unet(FAMILIES["sd1"]).float()
    folder = tmp_path_factory.mktemp("sd1")
    model.save_pretrained(folder)
    return model, load_unet(folder)


def step_inputs(batch=2, seed=0):
    r = np.random.RandomState(seed)
    lat = r.randn(batch, 4, 16, 12).astype(np.float32)
    noise = r.randn(batch, 4, 16, 12).astype(np.float32)
    ehs = r.randn(batch, 7, FAMILIES["sd1"]["cross_attention_dim"]).astype(np.float32)
    t = np.asarray([17, 803][:batch], np.int32)
    return lat, noise, ehs, t


def torch_step(model, lat, noise, ehs, t, prediction_type="epsilon", snr_gamma=None,
               added=None):
    """diffusers' training loss (as in its train_text_to_image script) and the gradients."""
    from diffusers.training_utils import compute_snr

    sched = ddpm()
    lat_t, noise_t, t_t = torch.from_numpy(lat), torch.from_numpy(noise), torch.from_numpy(t).long()
    noisy = sched.add_noise(lat_t, noise_t, t_t)
    target = noise_t if prediction_type == "epsilon" else sched.get_velocity(lat_t, noise_t, t_t)
    model.zero_grad()
    added_t = None if added is None else {k: torch.from_numpy(v) for k, v in added.items()}
    pred = model(noisy, t_t, torch.from_numpy(ehs), added_cond_kwargs=added_t).sample
    if snr_gamma is None:
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        snr = compute_snr(sched, t_t)
        w = torch.stack([snr, snr_gamma * torch.ones_like(t_t)], dim=1).min(dim=1)[0]
        w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        loss = (loss.mean(dim=list(range(1, loss.ndim))) * w).mean()
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()
             if p.grad is not None}
    return float(loss.detach()), grads


def our_step(unet, lat, noise, ehs, t, **kw):
    merge = kw.pop("merge", None)
    trainer = Trainer(unet, ddpm().alphas_cumprod.numpy(), TrainConfig(**kw), merge=merge)
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss))(
        unet.params, None, jnp.asarray(lat), jnp.asarray(ehs), jnp.asarray(noise),
        jnp.asarray(t))
    return float(loss), torch_state_dict(grads)


def grad_err(ours, ref):
    assert set(ours) == set(ref)
    keys = sorted(ref)
    a = np.concatenate([ours[k].ravel() for k in keys])
    b = np.concatenate([ref[k].ravel() for k in keys])
    return rel_err(a, b)


_PLAIN = {}  # gradients of the unmerged cases, for the merged case to differ from


@pytest.mark.parametrize("case", [
    dict(prediction_type="epsilon"),
    dict(prediction_type="v_prediction", snr_gamma=5.0),
    dict(prediction_type="epsilon", tome=0.5),
])
def test_step_equals_diffusers(sd1, case):
    """Loss and gradients of one step equal diffusers' UNet (tomesd-patched for ToMe)."""
    model, unet = sd1
    case = dict(case)
    ratio = case.pop("tome", None)
    args = step_inputs()
    if ratio:
        tomesd.apply_patch(model, ratio=ratio, use_rand=False)
    try:
        ref_loss, ref_grads = torch_step(model, *args, **case)
    finally:
        if ratio:
            tomesd.remove_patch(model)
    loss, grads = our_step(unet, *args, **case,
                           merge=ToMe(ratio=ratio, use_rand=False) if ratio else None)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert grad_err(grads, ref_grads) <= 1e-4
    key = tuple(sorted(case.items()))
    if not ratio:
        _PLAIN[key] = grads
    else:  # merging really changed the step
        plain = _PLAIN[key] if key in _PLAIN else our_step(unet, *args, **case)[1]
        assert grad_err(grads, plain) > 1e-3


def test_sdxl_step_equals_diffusers(tmp_path):
    """SDXL: one step's loss and gradients with the pooled text embeddings and size
    time ids equal diffusers' SDXL UNet (tiny SDXL config), and the added conditioning
    really enters them."""
    from tests.tiny import SDXL_TEXT_EMBEDS

    model = torch_unet(FAMILIES["sdxl"], seed=2).float()
    model.save_pretrained(tmp_path)
    unet = load_unet(tmp_path)
    r = np.random.RandomState(4)
    lat = r.randn(2, 4, 16, 16).astype(np.float32)
    noise = r.randn(2, 4, 16, 16).astype(np.float32)
    ehs = r.randn(2, 7, FAMILIES["sdxl"]["cross_attention_dim"]).astype(np.float32)
    t = np.asarray([40, 711], np.int32)
    added = {"text_embeds": r.randn(2, SDXL_TEXT_EMBEDS).astype(np.float32),
             "time_ids": np.asarray([[40, 48, 4, 0, 32, 32], [32, 64, 0, 16, 32, 32]],
                                    np.float32)}
    ref_loss, ref_grads = torch_step(model, lat, noise, ehs, t, "v_prediction", 5.0, added)
    trainer = Trainer(unet, ddpm().alphas_cumprod.numpy(),
                      TrainConfig(prediction_type="v_prediction", snr_gamma=5.0))

    step = jax.jit(jax.value_and_grad(trainer.loss))

    def ours(cond):
        loss, grads = step(
            unet.params, None, jnp.asarray(lat), jnp.asarray(ehs), jnp.asarray(noise),
            jnp.asarray(t), None, {k: jnp.asarray(v) for k, v in cond.items()})
        return float(loss), torch_state_dict(grads)

    loss, grads = ours(added)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert grad_err(grads, ref_grads) <= 1e-4
    other = dict(added, time_ids=added["time_ids"][::-1].copy())
    assert grad_err(ours(other)[1], ref_grads) > 1e-3  # the time ids matter


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from tests.pipeline_helpers import save_sdxl

    folder = tmp_path_factory.mktemp("sdxl")
    return folder, save_sdxl(folder)


def test_sdxl_training_data_path(tiny_sdxl, tmp_path):
    """`retom-jax train` on an SDXL pipeline (LoRA, ReToM): the cached conditioning equals
    diffusers' SDXL `encode_prompt` (both encoders' penultimate states, pooled embeds), the
    time ids are (original size, crop corner, target size) per image as diffusers'
    SDXL training script makes them, and the written LoRA file loads."""
    import json as _json

    from PIL import Image

    from retom_jax.cli import main
    from retom_jax.pipelines.loading import load_pipeline

    folder, torch_pipe = tiny_sdxl
    data = tmp_path / "data"
    data.mkdir()
    sizes = [(40, 40), (48, 32), (32, 56), (64, 48)]  # (height, width)
    captions = ["a red cat", "a photo of the dog", "a blurry car", "the painting of a cat"]
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as f:
        for i, ((h, w), c) in enumerate(zip(sizes, captions)):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(data / f"{i}.png")
            f.write(_json.dumps({"file_name": f"{i}.png", "text": c}) + "\n")
    out = tmp_path / "out"
    assert main(["train", "--model", str(folder), "--data", str(data), "--out", str(out),
                 "--resolution", "32", "--lora-rank", "4", "--steps", "3", "--batch-size",
                 "2", "--lr", "0.05", "--merge", "retom", "--caption-dropout", "0.3",
                 "--no-progress"]) == 0
    log = _json.loads((out / "train_log.json").read_text())
    assert len(log["losses"]) == 3 and np.all(np.isfinite(log["losses"]))
    (cache,) = (out / "cache").glob("*.npz")
    with np.load(cache) as z:
        enc = {k: z[k] for k in z.files}
    with torch.no_grad():
        ref_states, _, ref_pooled, _ = torch_pipe.encode_prompt(
            captions, device="cpu", do_classifier_free_guidance=False)
    assert rel_err(enc["states"][enc["index"]], ref_states.numpy()) <= 1e-5
    assert rel_err(enc["pooled"][enc["index"]], ref_pooled.numpy()) <= 1e-5
    # diffusers' script: resize the shorter side to 32, crop the centre, time ids =
    # (height, width) + (crop top, crop left) + (32, 32)
    expect = []
    for h, w in sizes:
        nh, nw = (int(32 * h / w), 32) if w <= h else (32, int(32 * w / h))
        expect.append([h, w, max(0, int(round((nh - 32) / 2.0))),
                       max(0, int(round((nw - 32) / 2.0))), 32, 32])
    np.testing.assert_array_equal(enc["time_ids"], np.asarray(expect, np.float32))
    # the LoRA file: diffusers' SDXL pipeline reads it as ours does (UNet outputs equal)
    pipe = load_pipeline(folder)
    pipe.load_lora(out / "pytorch_lora_weights.safetensors")
    r = np.random.RandomState(2)
    x = r.randn(1, 4, 8, 8).astype(np.float32)
    ehs = r.randn(1, 5, FAMILIES["sdxl"]["cross_attention_dim"]).astype(np.float32)
    added = {"text_embeds": r.randn(1, 16).astype(np.float32),
             "time_ids": np.asarray([[32, 32, 0, 0, 32, 32]], np.float32)}
    mine = np.asarray(pipe.unet(jnp.asarray(x), 500, jnp.asarray(ehs),
                                {k: jnp.asarray(v) for k, v in added.items()}).sample)

    def torch_out():
        with torch.no_grad():
            return torch_pipe.unet(torch.from_numpy(x), 500, torch.from_numpy(ehs),
                                   added_cond_kwargs={k: torch.from_numpy(v)
                                                      for k, v in added.items()}).sample.numpy()

    base = torch_out()
    torch_pipe.load_lora_weights(str(out))
    try:
        ref = torch_out()
    finally:
        torch_pipe.unload_lora_weights()
    check_bound(rel_err(mine, ref), 1e-5, "SDXL UNet with the written LoRA vs diffusers'")
    assert rel_err(ref, base) > 1e-3  # the adapters really changed the UNet


def test_lora_step_equals_peft(sd1):
    """LoRA: loss and adapter gradients equal diffusers' UNet with a peft adapter holding
    the same (non-zero) weights, alpha != rank."""
    from peft import LoraConfig

    model, unet = sd1
    rank, alpha = 4, 6.0
    lora = init_lora(unet.params, rank, jax.random.key(1))
    lora = {k: {"down": v["down"], "up": 0.1 * jax.random.normal(jax.random.key(i),
                                                                  v["up"].shape)}
            for i, (k, v) in enumerate(sorted(lora.items()))}
    ref_model = torch_unet(FAMILIES["sd1"]).float()
    ref_model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, mod in ref_model.named_modules():
            if name in lora:
                mod.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(lora[name]["down"]).T))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(lora[name]["up"]).T))
    args = step_inputs()
    ref_loss, ref_grads = torch_step(ref_model, *args)
    trainer = Trainer(unet, ddpm().alphas_cumprod.numpy(),
                      TrainConfig(lora_rank=rank, lora_alpha=alpha))
    lat, noise, ehs, t = (jnp.asarray(a) for a in args)
    loss, grads = jax.jit(jax.value_and_grad(trainer.loss))(lora, unet.params, lat, ehs, noise, t)
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    ours, ref = [], []
    for name, g in grads.items():
        ours += [np.asarray(g["down"]).T.ravel(), np.asarray(g["up"]).T.ravel()]
        ref += [ref_grads[f"{name}.lora_A.default.weight"].ravel(),
                ref_grads[f"{name}.lora_B.default.weight"].ravel()]
    assert len(lora) == 48 and len(ref_grads) == 96  # 6 blocks x 2 attentions x 4 projections
    assert rel_err(np.concatenate(ours), np.concatenate(ref)) <= 1e-4


def test_loss_falls_on_four_images(sd1):
    """A few dozen full fine-tuning steps on four latents lower the loss measured with
    fixed noise and timesteps (not the noisy training loss)."""
    _, unet = sd1
    r = np.random.RandomState(3)
    batch = {"latents": jnp.asarray(r.randn(4, 4, 8, 8).astype(np.float32)),
             "encoder_hidden_states": jnp.asarray(r.randn(4, 7, 24).astype(np.float32))}
    ac = ddpm().alphas_cumprod.numpy()
    trainer = Trainer(unet, ac, TrainConfig(steps=30, batch_size=4, learning_rate=3e-3,
                                            warmup_steps=3))
    noise = jnp.asarray(r.randn(4, 4, 8, 8).astype(np.float32))
    ts = jnp.asarray([50, 300, 600, 900])
    evaluate = jax.jit(lambda p: trainer.loss(p, None, batch["latents"],
                                              batch["encoder_hidden_states"], noise, ts))
    state = trainer.init()
    before = float(evaluate(state.params))
    for _ in range(30):
        state, metrics = trainer.step(state, batch, jax.random.key(0))
    after = float(evaluate(state.params))
    assert int(state.step) == 30 and np.isfinite(float(metrics["loss"]))
    assert after < 0.7 * before, (before, after)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    return folder, save_sd(folder)


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    return shapes.write_folder(tmp_path_factory.mktemp("data"), 4, size=40, seed=1)


def test_cli_lora_loads_in_diffusers(tiny_sd, four_images, tmp_path, capsys):
    """`retom-jax train --lora-rank` with ReToM on: the file it writes loads in diffusers,
    and diffusers' pipeline with it equals ours with it."""
    from retom_jax.cli import main
    from retom_jax.pipelines.loading import load_pipeline

    folder, torch_pipe = tiny_sd
    out = tmp_path / "lora"
    assert main(["train", "--model", str(folder), "--data", str(four_images), "--out", str(out),
                 "--resolution", "32", "--lora-rank", "4", "--lora-alpha", "8", "--steps", "6",
                 "--lr", "0.05", "--batch-size", "2", "--merge", "retom", "--checkpoint-every",
                 "4", "--no-progress"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["losses"]) == 6 and "ReToM" in log["merge"]
    assert (out / "loss.png").is_file() and (out / "checkpoints").is_dir()
    layers = read_lora(out / "pytorch_lora_weights.safetensors").layers["unet"]
    assert len(layers) == 48 and {(v.rank, v.alpha) for v in layers.values()} == {(4, 8.0)}

    ours = load_pipeline(folder)
    latents = latents_for(1, 32, 32)
    kw = dict(num_inference_steps=3, guidance_scale=7.5)
    plain = reference(torch_pipe, "a photo of a cat", latents, **kw)
    ours.load_lora(out / "pytorch_lora_weights.safetensors")  # retom_jax/lora.py reads it
    mine = ours("a photo of a cat", latents=latents, output_type="np", **kw).images
    torch_pipe.load_lora_weights(str(out))
    try:
        ref = reference(torch_pipe, "a photo of a cat", latents, **kw)
    finally:
        torch_pipe.unload_lora_weights()
    assert rel_err(mine, ref) <= 1e-3
    assert rel_err(ref, plain) > 1e-2  # the LoRA really changed the image

    # Resuming: the checkpoint at step 4 continues to 6 with the same losses.
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    import shutil
    kept = sorted((out / "checkpoints").glob("step_*.safetensors"))
    assert [p.name for p in kept] == ["step_000004.safetensors", "step_000006.safetensors"]
    shutil.copy(kept[0], again / "checkpoints")
    summary = train(folder, four_images, again, resolution=32, lora_rank=4, lora_alpha=8.0,
                    steps=6, learning_rate=0.05, batch_size=2, merge=ReToM(), progress=False,
                    log=lambda *_: None)
    np.testing.assert_allclose(summary["losses"], log["losses"], rtol=1e-5)


def test_full_finetune_folder_loads_in_diffusers(tiny_sd, four_images, tmp_path):
    """Full fine-tuning writes a diffusers UNet folder; diffusers' UNet read from it equals
    ours read from it, and it differs from the base model."""
    from diffusers import UNet2DConditionModel

    folder, torch_pipe = tiny_sd
    out = tmp_path / "full"
    summary = train(folder, four_images, out, resolution=32, steps=3, learning_rate=1e-3,
                    snr_gamma=5.0, progress=False, log=lambda *_: None)
    assert summary["output"].endswith("unet")
    ref_model = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    ours = load_unet(out / "unet")
    lat, _, ehs, t = step_inputs(1)
    ehs = ehs[:, :, :24]
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(lat), int(t[0]), torch.from_numpy(ehs)).sample.numpy()
        base = torch_pipe.unet(torch.from_numpy(lat), int(t[0]),
                               torch.from_numpy(ehs)).sample.numpy()
    mine = np.asarray(ours(jnp.asarray(lat), t[0], jnp.asarray(ehs)).sample)
    assert rel_err(mine, ref) <= 1e-5
    assert rel_err(ref, base) > 1e-4


def test_only_process_zero_writes(tiny_sd, four_images, tmp_path, monkeypatch):
    """In a multi-host run every process trains (the gathers are collective) but only
    process 0 writes: as process 1, `train` leaves its output folder without a file and
    returns the same losses as process 0."""
    folder, _ = tiny_sd
    kw = dict(resolution=32, lora_rank=2, steps=2, batch_size=2, learning_rate=0.05,
              checkpoint_every=1, progress=False, log=lambda *_: None)
    first = train(folder, four_images, tmp_path / "p0", **kw)
    assert (tmp_path / "p0" / "pytorch_lora_weights.safetensors").is_file()
    monkeypatch.setattr(jax, "process_index", lambda *_: 1)
    other = train(folder, four_images, tmp_path / "p1", **kw)
    assert [p for p in (tmp_path / "p1").rglob("*") if p.is_file()] == []
    assert other["losses"] == first["losses"]


def test_bad_input_is_one_clear_error(tiny_sd, four_images, tmp_path):
    from retom_jax.cli import main

    folder, _ = tiny_sd

    def error(capsys_args, match):
        with pytest.raises(TrainError, match=match):
            train(folder, **capsys_args, out=tmp_path / "o", progress=False, log=lambda *_: None)

    error(dict(data=tmp_path / "missing"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    error(dict(data=empty), "no metadata.jsonl")
    (empty / "metadata.jsonl").write_text("\n")
    error(dict(data=empty), "is empty")
    uncaptioned = tmp_path / "uncaptioned"
    shapes.write_folder(uncaptioned, 3, size=16)
    lines = (uncaptioned / "metadata.jsonl").read_text().splitlines()
    (uncaptioned / "metadata.jsonl").write_text(lines[0] + "\n")
    error(dict(data=uncaptioned), r"2 image\(s\) .* have no caption in metadata.jsonl")
    (uncaptioned / "metadata.jsonl").write_text('{"file_name": "00000.png"}\n')
    error(dict(data=uncaptioned), 'has no "text" caption')
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    (broken / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    error(dict(data=broken, resolution=32), "cannot be read as an image")
    error(dict(data=four_images, lora_rank=0), "LoRA rank must be a positive integer")
    error(dict(data=four_images, resolution=34), "not a multiple of 4")

    # A checkpoint made for another model: refused before anything compiles.
    other = tmp_path / "other"
    unet = load_unet(folder / "unet")
    trainer = Trainer(unet, np.linspace(0.99, 0.01, 10), TrainConfig(lora_rank=2))
    save_checkpoint(other / "checkpoints", trainer.init(), "some-other-model")
    with pytest.raises(TrainError, match="made for another model"):
        train(folder, four_images, other, resolution=32, lora_rank=2, progress=False,
              log=lambda *_: None)

    with pytest.raises(SystemExit):
        main(["train", "--model", str(folder), "--data", str(four_images), "--out",
              str(tmp_path / "x"), "--lora-rank", "0"])
    with pytest.raises(SystemExit):
        main(["train", "--demo", "--model", str(folder)])


def test_demo_draws_the_asked_colours():
    """The shipped demo model at its defaults (20 PLMS steps here, its guidance 3): the
    issue's example and three more, one call each as the CLI makes them, get the asked
    colours (``shapes.check_colors``: the background's colour covers the border, the
    shape's is the most common other colour in the middle); and over all 90 captions of
    its data set (one batch, seed 0) at least 85 do (measured: 90; seeds 0 and 1: 180 of
    180, ``python benchmarks/demo_quality.py --seeds 0 1``)."""
    from retom_jax.demo import build_demo_pipeline

    pipe = build_demo_pipeline()
    prompts = ["a red square on a green background", "a yellow triangle on a black background",
               "a black square on a blue background", "a white circle on a red background"]
    for prompt in prompts:
        image = pipe(prompt, num_inference_steps=20, seed=0, output_type="np").images[0]
        color, _, background = shapes.parse_caption(prompt)
        verdict = shapes.check_colors(np.asarray(image) * 255, color, background)
        assert verdict["both_ok"], (prompt, verdict)
    captions = shapes.all_captions()
    images = pipe(captions, num_inference_steps=20, seed=0, output_type="np").images
    right = []
    for caption, image in zip(captions, images):
        color, _, background = shapes.parse_caption(caption)
        right.append(shapes.check_colors(np.asarray(image) * 255, color, background)["both_ok"])
    assert sum(right) >= 85, [c for c, ok in zip(captions, right) if not ok]


def test_demo_recipe_runs(tmp_path):
    """`retom-jax train --demo`'s recipe end to end at a toy size (the shipped weights
    take ~20 minutes): every stage runs, the log and loss curve are written, the work
    folder is removed, and the folder loads as a demo pipeline that generates."""
    from retom_jax.demo import build_demo_pipeline
    from retom_jax.train.demo import train_demo

    out = train_demo(tmp_path / "demo", images=16, text_steps=40, vae_steps=2, unet_steps=3,
                     batch=4)
    log = json.loads((out / "train_log.json").read_text())
    assert (len(log["text_losses"]), len(log["vae_losses"]), len(log["unet_losses"])) == (40, 2, 3)
    assert log["text_losses"][-1] < 0.5 * log["text_losses"][0]  # the attribute heads learn
    assert (out / "loss.png").is_file() and not (out / "checkpoints").exists()
    pipe = build_demo_pipeline(path=out)
    image = pipe("a red square on a green background", num_inference_steps=2,
                 output_type="np").images
    assert np.asarray(image).shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_train_speed_smoke(tmp_path):
    """benchmarks/train_speed.py's CPU preset, cut to two rows: JSON with step times,
    compile time and XLA's memory figures."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import train_speed

    out = tmp_path / "t.json"
    assert train_speed.main(["--preset", "cpu", "--kinds", "lora", "--methods", "none",
                             "retom", "--iters", "1", "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["benchmark"] == "train_speed" and data["meta"]["complete"]
    rows = data["rows"]
    assert [(r["kind"], r["method"]) for r in rows] == [("lora", "none"), ("lora", "retom")]
    for r in rows:
        assert r.get("error") is None and r["finite"], r
        assert r["median_ms"] > 0 and r["compile_s"] > 0 and r["xla_total_gb"] > 0
    assert rows[1]["speedup"] > 0
