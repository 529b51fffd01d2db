"""Every multi-device check of training (and evaluation) on a mesh, run in ONE process with
8 host CPU devices: ``python -m tests.train_sharding_cases OUT.json`` (tests/test_train_mesh.py
starts it with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and reads the JSON).

Sharded training steps are compared with the same steps run unsharded in this process (the
unsharded step is compared with diffusers' torch UNet in tests/test_train.py).
"""
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import retom_jax as rj  # noqa: E402
from retom_jax import sharding  # noqa: E402
from retom_jax.train.trainer import TrainConfig, Trainer, TrainError
from retom_jax.train.loop import train  # noqa: E402
from tests import pipeline_helpers as ph  # noqa: E402
from tests.tiny import SD1  # noqa: E402

# the step cases: one level with attention (quicker compiles than SD1's two)
SMALL = dict(SD1, block_out_channels=(32,), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
MIN_SIZE = 256  # the tiny models' kernels are small: split every kernel of >= 256 values
STEPS = 3
BATCH = 8
MESHES = ("data=8", "data=4,fsdp=2")
KINDS = {  # full fine-tuning (fp32), LoRA, and bf16 weights trained through an fp32 master
    "full": dict(learning_rate=1e-3, warmup_steps=1),
    "lora": dict(learning_rate=1e-2, lora_rank=8, lora_alpha=4.0),
    "master": dict(learning_rate=1e-3, warmup_steps=1, master_fp32=True),
}
DTYPES = {"master": jnp.bfloat16}  # the UNet's weights and compute (float32 otherwise)


def mesh_of(text):
    sizes = sharding.parse_mesh(text)
    sizes.setdefault("data", 1)
    return rj.make_mesh(**sizes)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tree_rel(a, b):
    fa = np.concatenate([np.ravel(sharding.to_host(x)) for x in jax.tree.leaves(a)])
    fb = np.concatenate([np.ravel(sharding.to_host(x)) for x in jax.tree.leaves(b)])
    return rel(fa, fb)


def batch_of(seed=0, n=BATCH):
    r = np.random.RandomState(seed)
    return {"latents": r.randn(n, 4, 8, 8).astype(np.float32),
            "latents_std": 0.1 * np.abs(r.randn(n, 4, 8, 8)).astype(np.float32),
            "encoder_hidden_states": r.randn(n, 7, 24).astype(np.float32)}


def run(kind, mesh_text, ac, merge):
    unet = rj.init_unet(SMALL, seed=4, dtype=DTYPES.get(kind, jnp.float32))
    mesh = None if mesh_text is None else mesh_of(mesh_text)
    trainer = Trainer(unet, ac, TrainConfig(steps=10, batch_size=BATCH, **KINDS[kind]),
                      merge=merge, scaling_factor=0.5, mesh=mesh)
    state = trainer.init(jax.random.key(1))
    losses, t0 = [], time.perf_counter()
    for s in range(STEPS):
        state, metrics = trainer.step(state, batch_of(s), jax.random.key(5))
        losses.append(float(metrics["loss"]))
    return trainer, state, losses, time.perf_counter() - t0


def held_fractions(tree):
    """Per large leaf (>= MIN_SIZE values, 2-D or more): the share of it that one device
    holds, from the array's own shards."""
    out = []
    for a in jax.tree.leaves(tree):
        if a.ndim >= 2 and a.size >= MIN_SIZE:
            out.append(max(s.data.size for s in a.addressable_shards) / a.size)
    return out


def fsdp_report(trainer, state):
    """What one device holds under fsdp=2: trained leaves, their Adam moments, the frozen
    base UNet (LoRA), each from the arrays' shardings."""
    opt = state.opt_state
    moments = [x for x in jax.tree.leaves(opt, is_leaf=lambda n: hasattr(n, "mu"))
               if hasattr(x, "mu")]
    report = {
        "params": sorted(set(held_fractions(state.params))),
        "params_count": len(held_fractions(state.params)),
        "mu": sorted(set(held_fractions([m.mu for m in moments]))),
        "nu": sorted(set(held_fractions([m.nu for m in moments]))),
        "mu_count": len(held_fractions([m.mu for m in moments])),
        "step_replicated": state.step.sharding.is_fully_replicated,
    }
    if trainer.is_lora:
        report["base"] = sorted(set(held_fractions(trainer.unet.params)))
    return report


def training(root, out):
    """N steps of full and LoRA training with ReToM on each mesh against the same steps
    unsharded: losses and trained parameters; the fsdp split of parameters and moments."""
    ac = rj.load_pipeline(root).scheduler.alphas_cumprod()
    merge = rj.ReToM(ratio=0.5)
    for kind in KINDS:
        _, ref_state, ref_losses, ref_s = run(kind, None, ac, merge)
        ref_params = jax.tree.map(np.asarray, ref_state.params)
        for mesh_text in MESHES:
            trainer, state, losses, seconds = run(kind, mesh_text, ac, merge)
            row = {"train": kind, "mesh": mesh_text, "merge": "retom",
                   "loss_rel": rel(losses, ref_losses), "params_rel": tree_rel(state.params,
                                                                                ref_params),
                   "losses": losses, "ref_losses": ref_losses,
                   "compiles": trainer.compile_count, "seconds": seconds,
                   # what the step's batch argument is split over (its in_shardings)
                   "batch_spec": [list(a) if isinstance(a, tuple) else a
                                  for a in trainer.batch_sharding.spec],
                   "batch_devices": len({s.device for s in trainer.place_batch(
                       batch_of(0))["latents"].addressable_shards if s.data.shape[0] == 1}),
                   "unsharded_seconds": ref_s,
                   "out_sharding_kept": all(
                       a.sharding == s for a, s in zip(jax.tree.leaves(state),
                                                       jax.tree.leaves(trainer.state_sharding)))}
            if "fsdp" in mesh_text:
                row["fsdp"] = fsdp_report(trainer, state)
            row["dtypes"] = {"trained": sorted({str(a.dtype) for a in jax.tree.leaves(
                state.params)}), "unet": sorted({str(a.dtype) for a in jax.tree.leaves(
                    trainer.unet_params(state.params, trainer.frozen()))})}
            out.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)


def errors(root, out):
    def message(fn):
        try:
            fn()
        except (TrainError, ValueError) as e:
            return str(e)
        return None

    unet = rj.init_unet(SMALL)
    trainer = Trainer(unet, np.linspace(0.99, 0.01, 10), TrainConfig(batch_size=6),
                      mesh=mesh_of("data=4,fsdp=2"))
    state = trainer.init()
    out.append({"errors": {
        "batch": message(lambda: trainer.step(state, batch_of(0, 6), jax.random.key(0))),
        "spatial": message(lambda: Trainer(rj.init_unet(SMALL), np.ones(10) * 0.5,
                                           TrainConfig(), mesh=mesh_of("data=4,spatial=2"))),
        "train_batch": message(lambda: train(root, root, root / "x", batch_size=3,
                                                mesh=mesh_of("data=8"), progress=False)),
        "compiles": trainer.compile_count,
    }})
    # the one writer (save.py) gathers a model split over fsdp
    from retom_jax.pipelines.save import save_unet
    from retom_jax.models.weights import read_safetensors

    plain = rj.init_unet(SMALL)
    sharded = sharding.shard_params(plain.params, mesh_of("data=4,fsdp=2"))
    assert any(not a.sharding.is_fully_replicated for a in jax.tree.leaves(sharded))
    a = read_safetensors(save_unet(root / "u_plain", SMALL, plain.params)
                         / "diffusion_pytorch_model.safetensors")
    b = read_safetensors(save_unet(root / "u_sharded", SMALL, sharded)
                         / "diffusion_pytorch_model.safetensors")
    out.append({"save": {"keys": sorted(a) == sorted(b),
                         "equal": all(np.array_equal(np.asarray(a[k]), np.asarray(b[k]))
                                      for k in a)}})


def cli_run(root, folder, out):
    """``retom-jax train --mesh data=4,fsdp=2`` (LoRA, ReToM) against the same run
    without a mesh through the Python API: same losses, same adapters."""
    import contextlib
    import io

    from retom_jax import cli, shapes
    from retom_jax.models.lora import read_lora

    data = shapes.write_folder(folder / "data", 8, size=32, seed=2)
    common = dict(resolution=32, lora_rank=4, steps=2, batch_size=8, learning_rate=0.05)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["train", "--model", str(root), "--data", str(data), "--out",
                         str(folder / "mesh_out"), "--resolution", "32", "--lora-rank", "4",
                         "--steps", "2", "--batch-size", "8", "--lr", "0.05", "--merge",
                         "retom", "--mesh", "data=4,fsdp=2", "--no-progress"])
    plain = train(root, data, folder / "plain_out", merge=rj.ReToM(), progress=False,
                     log=lambda *_: None, **common)
    log = json.loads((folder / "mesh_out" / "train_log.json").read_text())
    a = read_lora(folder / "mesh_out" / "pytorch_lora_weights.safetensors").layers["unet"]
    b = read_lora(folder / "plain_out" / "pytorch_lora_weights.safetensors").layers["unet"]
    flat = [(np.asarray(a[k].up @ a[k].down), np.asarray(b[k].up @ b[k].down))
            for k in sorted(b)]
    out.append({"cli": {"code": code, "mesh": log["mesh"], "loss_rel": rel(log["losses"],
                                                                           plain["losses"]),
                        "lora_rel": rel(np.concatenate([x.ravel() for x, _ in flat]),
                                        np.concatenate([y.ravel() for _, y in flat])),
                        "layers": len(a)}})
    print(json.dumps(out[-1]), file=sys.stderr, flush=True)


def eval_cases(folder, out):
    """Evaluation on data=4,fsdp=2: CLIP image embeddings, CLIP scores, CMMD embeddings and
    Inception features of sharded batches equal the unsharded ones; `retom-jax eval
    --mesh` runs end to end and its metrics equal the same images measured unsharded."""
    import contextlib
    import io

    import torch

    from retom_jax import cli
    from retom_jax.eval import run as eval_run
    from retom_jax.eval.clip_vision import clip_scores, image_embeddings, load_clip
    from retom_jax.eval.inception import load_inception
    from retom_jax.eval.metrics import cmmd_embeddings, shard_models
    from tests.eval_tiny import random_inception, save_tiny_clip

    save_tiny_clip(folder / "clip")
    weights = folder / "pt_inception-tiny.pth"
    torch.save(random_inception(div=8).state_dict(), weights)
    images = np.random.default_rng(0).integers(0, 256, (12, 48, 48, 3), dtype=np.uint8)
    prompts = ["a photo of a cat", "a painting of the dog", "a red car"] * 4
    bs = 8  # 12 images: a full batch and a padded one

    def features(mesh):
        clip, inception = load_clip(folder / "clip"), load_inception(weights)
        if mesh is not None:
            shard_models(mesh, clip, inception)
        incep = np.concatenate([eval_run._padded(lambda b: inception(b / 255.0), images[i:i + bs]
                                                 .astype(np.float32), bs)
                                for i in range(0, len(images), bs)])
        return {"clip_embeds": image_embeddings(clip, images, bs),
                "clip_scores": clip_scores(clip, images, prompts, bs),
                "cmmd": cmmd_embeddings(clip, images, bs), "inception": incep}, clip, inception

    plain, _, _ = features(None)
    mesh = mesh_of("data=4,fsdp=2")
    sharded, clip, inception = features(mesh)
    row = {"eval": {k: rel(sharded[k], plain[k]) for k in plain}}
    row["eval_sharded"] = {
        "clip_vision_params": sorted(set(held_fractions(clip.vision.params))),
        "inception_params": sorted(set(held_fractions(inception.params)))}
    try:
        clip.vision(np.zeros((6, 3, 30, 30), np.float32))
    except ValueError as e:
        row["eval_batch_error"] = str(e)

    from PIL import Image

    prompt_file = folder / "prompts.txt"
    prompt_file.write_text("a photo of a cat\na painting of the dog\n")
    ref = folder / "reference"  # random images: CMMD and FID far from zero
    ref.mkdir()
    for i, im in enumerate(images[:5]):
        Image.fromarray(im).save(ref / f"{i}.png")
    argv = ["eval", "--model", "demo", "--prompts", str(prompt_file), "--methods", "none",
            "--steps", "1", "--seeds", "2", "--clip", str(folder / "clip"), "--inception",
            str(weights), "--reference", str(ref), "--batch-size", "8",
            "--out", str(folder / "eval_mesh")]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(argv + ["--mesh", "data=4,fsdp=2"])
    result = json.loads((folder / "eval_mesh" / "results.json").read_text())
    args = cli.build_parser().parse_args(argv)
    again = eval_run.measure(args, [ln for ln in prompt_file.read_text().splitlines()],
                             eval_run.run_list(("none",), ()), folder / "eval_mesh",
                             {}, clip=load_clip(folder / "clip"),
                             inception=load_inception(weights), log=lambda *_: None)
    fields = ("clip_score", "cmmd", "fid", "psnr", "ssim")
    row["eval_cli"] = {
        "code": code, "mesh": result["settings"]["mesh"], "stdout_mesh": "mesh {" in buf.getvalue(),
        "rows": len(result["rows"]), "values": result["rows"][0],
        "rel": {f"{r['run']}.{k}": abs(r[k] - a[k]) / max(abs(a[k]), 1e-6)
                for r, a in zip(result["rows"], again) for k in fields if k in a}}
    out.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)


def bench_run(folder, out):
    """benchmarks/train_speed.py --mesh as a smoke test: one LoRA row on data=4,fsdp=2."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import train_speed

    train_speed.main(["--preset", "cpu", "--kinds", "lora", "--methods", "none", "--iters",
                      "1", "--warmup", "0", "--batch", "8", "--mesh", "data=4,fsdp=2",
                      "--out", str(folder / "train_speed.json")])
    out.append({"train_speed": json.loads((folder / "train_speed.json").read_text())})


def main(path):
    sharding.MIN_SHARD_SIZE = MIN_SIZE
    out = [{"devices": jax.device_count()}]
    folder = Path(path).parent
    root = folder / "sd"
    ph.save_sd(root)
    seconds = {}
    for name, fn in (("errors", lambda: errors(root, out)), ("training", lambda: training(root, out)),
                     ("cli", lambda: cli_run(root, folder, out)),
                     ("eval", lambda: eval_cases(folder, out)),
                     ("bench", lambda: bench_run(folder, out))):
        t0 = time.perf_counter()
        fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
    out.append({"seconds": seconds})
    Path(path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
