"""Sharded splash attention on 8 host CPU devices in Pallas interpret mode:
``python -m tests.tpu_cases OUT.json`` (tests/test_tpu.py starts it with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and reads the JSON).

For each mesh, ``attention.sharded_splash_attention`` (splash through ``shard_map``) under
a sharded ``jax.jit`` is compared with the unsharded XLA attention, and the compiled
program's collectives are counted (none may gather q, k or v when the batch or heads
divide). The kernel runs in Pallas's generic interpreter (``interpret=True``): the TPU
interpret mode (``force_tpu_interpret_mode``) simulates the devices' shared memory with
host callbacks that deadlock on a few CPU cores with 8 devices. That the mesh's compile
target reaches this path is checked by the TPU compile (tests/test_tpu.py).
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from retom_jax import sharding  # noqa: E402
from retom_jax.models import attention  # noqa: E402

CASES = [  # (mesh, batch, heads, q tokens, kv tokens, head size)
    ("data=8", 8, 2, 256, 256, 64),
    ("data=4,fsdp=2", 8, 2, 200, 136, 40),     # padded blocks and head size
    ("data=2,spatial=4", 4, 2, 512, 512, 64),  # queries split over spatial
    ("data=8", 2, 8, 256, 77, 64),             # batch 2 on 8 devices: heads split
]


def run_case(mesh_text, b, h, tq, tk, d):
    mesh = sharding.make_mesh(**sharding.parse_mesh(mesh_text))
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, tq, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, tk, h, d), jnp.float32)
    v = jax.random.normal(keys[2], (b, tk, h, d), jnp.float32)
    want = attention.xla_attention(q, k, v)
    q_spec, kv_spec = attention.splash_partition(mesh, b, h, tq)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    args = (put(q, q_spec), put(k, kv_spec), put(v, kv_spec))

    def f(q, k, v):
        return attention.sharded_splash_attention(q, k, v, mesh, interpret=True)

    jitted = jax.jit(f)
    compiled = jitted.lower(*args).compile()
    got = jitted(*args)
    return {"mesh": mesh_text, "shape": [b, tq, h, d], "kv_tokens": tk,
            "q_spec": str(q_spec), "kv_spec": str(kv_spec),
            "max_err": float(jnp.max(jnp.abs(got - want))),
            "out_sharding": str(got.sharding.spec),
            "collectives": sharding.count_collectives(compiled.as_text())}


def main(out):
    rows = [run_case(*case) for case in CASES]
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
