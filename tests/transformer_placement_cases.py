"""Where the sharding rules put a tiny Flux's and SD3's parameters on ``fsdp=4`` (4 host
CPU devices): ``python -m tests.transformer_placement_cases OUT.json``
(tests/test_tpu_transformers.py starts it through ``run_on_host_devices``). Abstract
parameters only: nothing is computed, no weights are made."""
import json
import math
import sys
from pathlib import Path

import jax

from retom_jax import sharding
from retom_jax.analysis.tpu_transformers import (abstract_transformer, flux_pipeline_program,
                                                 param_bytes)


def main(out):
    mesh = sharding.make_mesh(data=1, fsdp=4)
    rows = [{"devices": jax.device_count()}]
    for model in ("flux-tiny", "sd3-tiny"):
        tr = abstract_transformer(model, mesh)
        leaves = jax.tree_util.tree_leaves_with_path(tr.params)
        big = {jax.tree_util.keystr(p): str(a.sharding.spec) for p, a in leaves
               if a.ndim == 2 and math.prod(a.shape) >= sharding.MIN_SHARD_SIZE}
        total, per = param_bytes(tr.params)
        rows.append({"model": model, "mesh": str(tr.mesh.shape), "big_kernels": big,
                     "param_bytes": total, "param_bytes_per_device": per})
    jitted, args, info = flux_pipeline_program("flux-tiny", mesh, "retom", size=64, batch=1,
                                               steps=2)
    compiled = jitted.lower(*args).compile()
    rows.append({"pipeline": "flux-tiny", **info,
                 "collectives": sharding.count_collectives(compiled.as_text()),
                 "output": [list(o.shape) for o in jax.tree_util.tree_leaves(
                     compiled.out_info)]})
    Path(out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1])
