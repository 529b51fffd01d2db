"""The Flux pipeline on a mesh of 4 host CPU devices: ``python -m tests.flux_mesh_cases
OUT.json`` (tests/test_flux_pipeline.py starts it through ``run_on_host_devices``). The
transformer's and VAE's kernels are split over ``fsdp`` (a small ``min_size`` so the tiny
model's kernels split) and the images compared with the unsharded pipeline."""
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

import retom_jax as rj
from retom_jax import sharding
from tests.flux_helpers import TEXT_TOKENS, save_flux


def main(out):
    folder = Path(tempfile.mkdtemp())
    save_flux(folder)
    plain = rj.load_pipeline(folder)
    mesh = rj.make_mesh(data=1, fsdp=4)
    sharded = rj.load_pipeline(folder, mesh=mesh)
    for part in (sharded.transformer, sharded.vae):
        part.params = sharding.shard_params(part.params, mesh, min_size=64)
    split = sum("fsdp" in str(leaf.sharding.spec)
                for leaf in jax.tree_util.tree_leaves(sharded.transformer.params))
    rows = [{"devices": jax.device_count(), "split_kernels": split}]
    kw = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=TEXT_TOKENS,
              output_type="np", seed=3)
    for merge in (rj.ReToM(ratio=0.5, merge_mlp=True, cache_step=0),):  # merging on a mesh
        a, b = plain("a cat", merge=merge, **kw).images, sharded("a cat", merge=merge, **kw).images
        rows.append({"merge": repr(merge),
                     "rel": float(np.linalg.norm(a - b) / np.linalg.norm(a))})
    Path(out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1])
