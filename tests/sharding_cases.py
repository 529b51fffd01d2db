"""Every multi-device check of tests/test_sharding.py, run in ONE process with 8 host CPU
devices: ``python -m tests.sharding_cases OUT.json`` (the test module starts it with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and reads the JSON).

Sharded images are compared with the same pipeline run unsharded in this process (the
unsharded pipelines are compared with diffusers in test_pipeline.py). Cases cover each
mesh and each merging method without the full cross product, to keep compiles few.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import retom_jax as rj  # noqa: E402
from retom_jax import sharding  # noqa: E402
from tests import pipeline_helpers as ph  # noqa: E402
from tests.tiny import SD1  # noqa: E402

MIN_SIZE = 256  # the tiny models' kernels are small: split every kernel of >= 256 values
PROMPTS = ["a cat", "a dog", "red car"]  # 3 images: padded to the batch shards
STEPS = 2

SD_CASES = [  # (mesh, merge name): every mesh and every method, not every pair
    ("data=8", "tome"),
    ("data=4,fsdp=2", "retom"),
    ("data=2,fsdp=2,spatial=2", "retom_cached"),
    ("spatial=8", "todo"),
    ("data=2,fsdp=2,spatial=2", "tome+cache"),  # step caching: its feature is sharded too
]
SDXL_CASES = [
    ("data=8", "none"),
    ("data=4,fsdp=2", "tome"),
    ("data=2,fsdp=2,spatial=2", "retom"),
]


def merge_of(name, xl):
    md = 2 if xl else 1  # SDXL's attention starts at downsample 2
    name = name.removesuffix("+cache")
    return {
        "none": None,
        "tome": rj.ToMe(ratio=0.5, max_downsample=md),
        "retom": rj.ReToM(ratio=0.5, max_downsample=md),
        "retom_cached": rj.ReToM(ratio=0.5, cache_step=0, max_downsample=md),
        "todo": rj.ToDo(factor=2, max_downsample=md),
    }[name]


def cache_of(name):
    return rj.StepCache(interval=2) if name.endswith("+cache") else None


def mesh_of(text):
    sizes = sharding.parse_mesh(text)
    sizes.setdefault("data", 1)
    return rj.make_mesh(**sizes)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def parity(root, family, cases, out, keep=None):
    plain = rj.load_pipeline(root)
    kw = dict(num_inference_steps=STEPS, output_type="np", seed=3)
    refs = {}
    for mesh_text, name in cases:
        xl = family == "sdxl"
        if name not in refs:
            refs[name] = plain(PROMPTS, merge=merge_of(name, xl), step_cache=cache_of(name),
                               **kw).images
        pipe = rj.load_pipeline(root, mesh=mesh_of(mesh_text))
        got = pipe(PROMPTS, merge=merge_of(name, xl), step_cache=cache_of(name), **kw)
        row = {"family": family, "mesh": mesh_text, "merge": name,
               "rel": rel(got.images, refs[name]), "shape": list(got.images.shape)}
        if (family, mesh_text) == ("sd", "data=8"):
            # no recompiles across prompts and seeds; padding: 2 prompts x 2 images (4
            # images padded to 8, the same program) and an ancestral sampler (per-step noise
            # drawn for the padded batch) still equal the unsharded runs
            same = dict(kw, merge=merge_of(name, xl))
            before = pipe.compile_count
            pipe(["the car", "a photo", "blurry"], **dict(same, seed=11))
            row["recompiles"] = pipe.compile_count - before
            two = pipe(PROMPTS[:2], num_images_per_prompt=2, **dict(same, seed=12)).images
            row["sample_programs"] = sum(k[0] == "sample" for k in pipe._compiled)
            row["per_prompt_rel"] = rel(two, plain(PROMPTS[:2], num_images_per_prompt=2,
                                                   **dict(same, seed=12)).images)
            a_ref = plain.with_scheduler("euler_a")(PROMPTS, **kw).images
            a_got = pipe.with_scheduler("euler_a")(PROMPTS, **kw).images
            row["euler_a_rel"] = rel(a_got, a_ref)
        if mesh_text == "data=4,fsdp=2" and family == "sd":
            row["fsdp"] = fsdp_report(pipe)
            np.save(keep, got.images)  # the two-process run must give these images
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)


def fsdp_report(pipe):
    """How much of each model one device holds under fsdp=2."""
    report = {}
    for name in ("unet", "vae", "text_encoder"):
        leaves = jax.tree.leaves(getattr(pipe, name).params)
        total = sum(a.nbytes for a in leaves)
        dev0 = jax.devices()[0]
        held = sum(s.data.nbytes for a in leaves for s in a.addressable_shards
                   if s.device == dev0)
        big = [a for a in leaves if a.size >= MIN_SIZE and a.ndim >= 2]
        ratios = sorted({s.data.size / a.size for a in big for s in a.addressable_shards})
        report[name] = {"fraction_held": held / total, "large_kernel_shard_ratios": ratios,
                        "large_kernels": len(big)}
    return report


def unet_programs(out):
    """Per-device memory of one UNet call (memory_analysis) against the mesh shape, and
    the collectives in the compiled HLO under spatial=8 with and without merging."""
    cases = [  # (mesh, batch, merge): one image per device in the memory rows
        ("data=8", 8, None), ("data=4,fsdp=2", 8, None), ("spatial=8", 1, None),
        ("spatial=8", 1, "retom"),
    ]
    for mesh_text, batch, merge_name in cases:
        mesh = mesh_of(mesh_text)
        unet = rj.init_unet(SD1)
        unet.params = sharding.shard_params(unet.params, mesh, MIN_SIZE)
        unet.mesh = mesh
        x = jax.device_put(jnp.ones((batch, 4, 16, 16)),
                           NamedSharding(mesh, sharding.latent_spec(mesh)))
        e = jax.device_put(jnp.ones((batch, 7, SD1["cross_attention_dim"])),
                           NamedSharding(mesh, sharding.logical_spec(("batch", None, None), mesh)))
        merge = None if merge_name is None else merge_of(merge_name, False)
        fn = jax.jit(lambda p, x, e, m=merge: unet.apply(p, x, jnp.float32(10.0), e, merge=m))
        compiled = fn.lower(unet.params, x, e).compile()
        mem = compiled.memory_analysis()
        out.append({"unet": True, "mesh": mesh_text, "batch": batch, "merge": merge_name or "none",
                    "argument_bytes": int(mem.argument_size_in_bytes),
                    "temp_bytes": int(mem.temp_size_in_bytes),
                    "collectives": sharding.count_collectives(compiled.as_text())})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)


def errors(roots, out):
    def message(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    sdxl = rj.load_pipeline(roots["sdxl"], mesh=mesh_of("spatial=8"))  # 16 latent rows, 3 levels
    sd = rj.load_pipeline(roots["sd"], mesh=mesh_of("spatial=8"))
    before = sd.compile_count + sdxl.compile_count
    out.append({"errors": {
        "mesh_size": message(lambda: rj.make_mesh(data=3)),
        "unknown_axis": message(lambda: rj.make_mesh(data=4, tensor=2)),
        "spatial_levels": message(lambda: sdxl(PROMPTS, num_inference_steps=1)),
        "window": message(lambda: sd(PROMPTS, num_inference_steps=1,
                                     merge=rj.ReToM(ratio=0.5, window=(4, 4)))),
        "compiled": sd.compile_count + sdxl.compile_count - before,
    }})


def cli_run(folder, out):
    """``retom-jax generate --mesh data=4,fsdp=2 --num-images 8`` on the demo model."""
    import contextlib
    import io

    from retom_jax import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(["generate", "--model", "demo", "--prompt", "a cat", "--steps", "1",
                         "--mesh", "data=4,fsdp=2", "--num-images", "8",
                         "--height", "64", "--width", "64",
                         "--out", str(folder / "cli" / "img.png")])
    out.append({"cli": {"code": code, "files": sorted(p.name for p in (folder / "cli").iterdir()),
                        "stdout": buf.getvalue()}})


def scaling_run(folder, out):
    """benchmarks/scaling.py as a smoke test: one mesh, pipeline and UNet rows."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import scaling

    scaling.main(["--preset", "cpu", "--no-sweep", "--meshes", "data=4,fsdp=2", "--size", "32",
                  "--steps", "1", "--repeats", "1", "--out", str(folder / "scaling.json")])
    out.append({"scaling": json.loads((folder / "scaling.json").read_text())})


def main(path):
    sharding.MIN_SHARD_SIZE = MIN_SIZE
    out = [{"devices": jax.device_count()}]
    folder = Path(path).parent  # the tiny pipelines stay there for the two-process test
    roots = {"sd": folder / "sd", "sdxl": folder / "sdxl"}
    ph.save_sd(roots["sd"])
    ph.save_sdxl(roots["sdxl"])
    errors(roots, out)
    parity(roots["sd"], "sd", SD_CASES, out, keep=folder / "sd_fsdp_retom.npy")
    parity(roots["sdxl"], "sdxl", SDXL_CASES, out)
    unet_programs(out)
    cli_run(folder, out)
    scaling_run(folder, out)
    out.append({"folder": str(folder)})
    Path(path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
