"""One process of a two-process run (tests/test_sharding.py starts two):
``python -m tests.distributed_cases PIPELINE_FOLDER PORT PROCESS_ID OUT_DIR``.

Each process has 4 host CPU devices; together they form one 8-device mesh
(``data=4,fsdp=2``) through ``rj.initialize_distributed`` (coordinator on 127.0.0.1).
Process 0 writes the images; tests/sharding_cases.py made the same call in one process
(its ``sd`` ``data=4,fsdp=2`` ReToM case).
"""
import json
import os
import sys
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "").replace(
    "--xla_force_host_platform_device_count=8", "")
    + " --xla_force_host_platform_device_count=4")

import numpy as np  # noqa: E402

import retom_jax as rj  # noqa: E402
from retom_jax import sharding  # noqa: E402


def main(folder, port, pid, out):
    index, count = rj.initialize_distributed(f"127.0.0.1:{port}", 2, int(pid))
    import jax

    sharding.MIN_SHARD_SIZE = 256
    info = {"process": index, "processes": count, "devices": jax.device_count(),
            "local_devices": jax.local_device_count()}
    mesh = rj.make_mesh(data=4, fsdp=2)
    pipe = rj.load_pipeline(folder, mesh=mesh)
    kw = dict(num_inference_steps=2, output_type="np", seed=3, merge=rj.ReToM(ratio=0.5))
    images = pipe(["a cat", "a dog", "red car"], **kw).images  # as sharding_cases.py
    held = [a for a in jax.tree.leaves(pipe.unet.params) if a.ndim >= 2 and a.size >= 256]
    info["fully_addressable_params"] = sum(a.is_fully_addressable for a in held)
    # the share of the large kernels' bytes this host holds (distinct shards of its devices)
    mine = sum(len({str(s.index) for s in a.addressable_shards})
               * a.addressable_shards[0].data.nbytes for a in held)
    info["host_fraction"] = round(mine / sum(a.nbytes for a in held), 3)
    if index == 0:
        np.save(Path(out) / "two_processes.npy", images)
    (Path(out) / f"info{index}.json").write_text(json.dumps(info))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
