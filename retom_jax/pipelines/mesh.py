"""A pipeline on a device mesh: its weights placed by the sharding rules, the sampling
program's arguments placed (the batch over ``data`` x ``fsdp``, latent rows over
``spatial``) and jitted with those shardings. The rules themselves are generic
(:mod:`retom_jax.sharding`)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ..sharding import latent_spec, logical_spec, pad_rows, padded_batch, shard_params, to_global



def shard_pipeline(pipe, mesh: Mesh, min_size: int | None = None):
    """Put an already loaded pipeline's parameters on ``mesh`` (by the rules) and run its
    later calls there. ``load_pipeline(..., mesh=mesh)`` does this while reading."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            model.params = shard_params(model.params, mesh, min_size)
            model.mesh = mesh
    pipe.mesh = mesh
    pipe.reset_compiled()
    return pipe


def place_sample_args(pipe, static, args):
    """Pad the batch and place the sampling program's arguments on the pipeline's mesh:
    returns ``(static, args)`` with ``static.batch`` the padded batch and ``static.pad``
    the rows to drop."""
    mesh = pipe.mesh
    params, cond, latents, state, key, g = args
    batch = static.batch
    rows = padded_batch(batch, mesh)
    groups = 2 if static.guidance else 1
    lat = pad_rows(np.asarray(latents, np.float32), rows)
    shape = lat.shape
    lat_sh = NamedSharding(mesh, latent_spec(mesh))
    rep = NamedSharding(mesh, P())

    def put_cond(x):  # every conditioning leaf has ``groups * batch`` rows
        x = pad_rows(np.asarray(x), rows, groups)
        spec = logical_spec(("batch",) + (None,) * (x.ndim - 1), mesh)
        return to_global(x, NamedSharding(mesh, spec))

    cond = {k: put_cond(v) for k, v in cond.items()}
    if rows != batch:
        state = static.scheduler.set_timesteps(static.num_inference_steps, shape, jnp.float32)

    def put_state(x):
        x = np.asarray(x)
        return to_global(x, lat_sh if x.shape == shape else rep)

    state = jax.tree.map(put_state, state)
    key = jax.random.wrap_key_data(to_global(jax.random.key_data(key), rep)) \
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else to_global(key, rep)
    g = jax.tree.map(lambda v: to_global(v, rep), g)  # guidance scale and other scalars
    args = (params, cond, to_global(lat, lat_sh), state, key, g)
    static = dataclasses.replace(static, batch=rows, pad=rows - batch)
    return static, args


def sample_jit(fn, mesh: Mesh, args, decode: bool):
    """``jax.jit(fn)`` with the shardings of ``args`` as its input shardings and the
    batch- (and row-) sharded images or latents as its output sharding."""
    in_sh = jax.tree.map(lambda a: a.sharding, args)
    out_sh = NamedSharding(mesh, latent_spec(mesh, 4, 1 if decode else 2))
    return jax.jit(fn, static_argnums=0, in_shardings=in_sh, out_shardings=out_sh)


# ----------------------------------------------------------------------------- HLO
