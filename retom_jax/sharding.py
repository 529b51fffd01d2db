"""Running a pipeline across a device mesh: data, FSDP and spatial parallelism.

Everything here is JAX's own sharding (``jax.sharding.Mesh``, ``NamedSharding``,
``jax.jit`` with explicit shardings, ``jax.distributed`` for several hosts); XLA's SPMD
partitioner inserts the collectives.

* :func:`make_mesh` builds a mesh with the axes ``("data", "fsdp", "spatial")``; several
  TPU slices give a hybrid mesh with ``data`` across slices (slow links carry only the
  data-parallel traffic).
* :data:`LOGICAL_AXIS_RULES` is the ONE table that maps logical axes (of parameters and of
  activations) to mesh axes. Parameter partition specs are derived from it
  (:func:`param_spec`): a large kernel is split along one dimension over ``fsdp`` (the
  first of its dimensions, in table order, that ``fsdp`` divides), everything else is
  replicated; nothing is split over ``data``.
* Loaders called with ``mesh=`` build every device's shard straight from the
  safetensors file (:func:`param_placement` -> ``jax.make_array_from_callback`` in
  ``weights.load_params``): with ``fsdp > 1`` no device, and no host, holds the whole model.
* A pipeline on a mesh pads its image batch to a multiple of ``data * fsdp`` (copies of
  its last row, dropped from the output: :func:`padded_batch`), shards the batch (and the
  guidance batch) over ``("data", "fsdp")`` and the latent rows over ``spatial``, and runs
  the whole sampling loop and the VAE decode as one jitted program whose input and output
  shardings are given explicitly.
* Spatial sharding splits the latent rows; merge windows never straddle a shard
  (:func:`check_split`), but ReToM / ToMe choose their merged tokens over the whole image,
  so merging adds a few all-reduces per merged block (README, "Scaling across devices").
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "AXES", "LOGICAL_AXIS_RULES", "MIN_SHARD_SIZE", "make_mesh", "parse_mesh", "logical_spec",
    "param_logical_axes", "param_spec", "param_placement", "shard_params", "padded_batch",
    "check_split", "initialize_distributed", "mesh_shape", "to_host", "shard_batch",
    "abstract_params", "abstract_array", "token_constraint",
]

AXES = ("data", "fsdp", "spatial")

# The one table: logical axis -> mesh axis (or axes, or None = replicated). Parameters
# name their dimensions with the logical axes of ``param_logical_axes``; activations with
# "batch", "rows", "cols", "channels", "tokens". For parameters the ORDER matters: a
# kernel is split along the first of its dimensions, in this order, whose size the mesh
# axis divides ("out" before "in": output features / conv output channels first).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),   # images (and the guidance batch)
    ("rows", "spatial"),           # latent / feature-map rows
    ("cols", None),
    ("channels", None),
    ("tokens", None),              # text tokens
    ("out", "fsdp"),               # a kernel's output features / channels
    ("in", "fsdp"),                # ... or its input features where "out" does not divide
    ("vocab", "fsdp"),             # embedding tables: rows ...
    ("embed", "fsdp"),             # ... or features
    ("window", None),              # a conv kernel's height and width
    ("rank", None),                # a LoRA adapter's rank (its "down" is (in, rank), "up" (rank, out))
    ("vector", None),              # 1-D leaves: biases, norm scales
)
_RULES = dict(LOGICAL_AXIS_RULES)
_ORDER = {name: i for i, (name, _) in enumerate(LOGICAL_AXIS_RULES)}

# Leaves with fewer elements than this stay replicated under fsdp (their gather would cost
# more than they weigh). 2**16 elements: SD's kernels from 320x320 up are split.
MIN_SHARD_SIZE = 1 << 16


# ----------------------------------------------------------------------------- meshes

def _check_size(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
            value < 1 and value != -1):
        raise ValueError(f"mesh axis {name} must be a positive int or -1 (the rest of the "
                         f"devices), got {value!r}")
    return int(value)


def make_mesh(data: int = -1, fsdp: int = 1, spatial: int = 1, devices=None,
              **unknown) -> Mesh:
    """A ``Mesh`` with the axes ``("data", "fsdp", "spatial")`` over ``devices`` (default:
    every device of every process). One size may be ``-1``: it takes the devices left.

    The product of the sizes must equal the number of devices. Devices spread over several
    TPU slices (``device.slice_index``) give a hybrid mesh: ``data`` spans the slices (it
    must be a multiple of their number), ``fsdp`` and ``spatial`` stay inside a slice.
    """
    if unknown:
        name = sorted(unknown)[0]
        raise ValueError(f"unknown mesh axis {name!r}: the axes are {', '.join(AXES)}")
    sizes = {"data": _check_size("data", data), "fsdp": _check_size("fsdp", fsdp),
             "spatial": _check_size("spatial", spatial)}
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh got no devices")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {', '.join(free)}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"mesh {_describe(sizes)}: the fixed axes take {fixed} devices, "
                             f"which does not divide the {len(devices)} devices present")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh {_describe(sizes)} needs {total} devices, but there are "
                         f"{len(devices)}: make the sizes multiply to {len(devices)} "
                         f"(or leave one at -1)")
    shape = tuple(sizes[a] for a in AXES)
    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    if len(slices) > 1:
        n = len(slices)
        if sizes["data"] % n:
            raise ValueError(f"the devices span {n} slices: data={sizes['data']} must be a "
                             f"multiple of {n} (data runs across slices)")
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(
            (sizes["data"] // n, sizes["fsdp"], sizes["spatial"]), (n, 1, 1), devices)
    else:
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices)
        except Exception:  # backends without a topology model (host devices): in order
            grid = np.array(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def _describe(sizes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def parse_mesh(text: str) -> dict:
    """``"data=4,fsdp=2"`` -> ``{"data": 4, "fsdp": 2}`` (the CLI's ``--mesh``)."""
    out = {}
    for part in str(text).split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"mesh entry {part!r} is not name=size (e.g. data=4,fsdp=2)")
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r}: the axes are {', '.join(AXES)}")
        if name in out:
            raise ValueError(f"mesh axis {name} given twice")
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name}={value!r}: the size must be an int") from None
    return out


def mesh_shape(mesh: Mesh) -> dict:
    return {a: int(mesh.shape.get(a, 1)) for a in AXES}


# ----------------------------------------------------------------------------- rules

def logical_spec(names, mesh: Mesh) -> P:
    """The PartitionSpec of an array whose dimensions have these logical names (None:
    replicated); mesh axes of size 1 are left out."""
    out = []
    for name in names:
        target = _RULES.get(name) if name is not None else None
        if name is not None and name not in _RULES:
            raise ValueError(f"logical axis {name!r} is not in LOGICAL_AXIS_RULES")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_logical_axes(path, shape) -> tuple:
    """Logical names of a parameter's dimensions, from its leaf name and rank."""
    leaf = str(path[-1]) if path else ""
    if len(shape) <= 1:
        return ("vector",) * len(shape)
    if leaf == "embedding" and len(shape) == 2:
        return ("vocab", "embed")
    if leaf == "pos_embed" and len(shape) == 3:  # SD3's position table [1, m * m, D]
        return (None, "vocab", "embed")
    if leaf in ("down", "up") and len(shape) == 2:  # LoRA adapters (retom_jax.train)
        return ("in", "rank") if leaf == "down" else ("rank", "out")
    if len(shape) == 2:   # Linear kernel (in, out)
        return ("in", "out")
    if len(shape) == 4:   # Conv kernel HWIO
        return ("window", "window", "in", "out")
    return (None,) * len(shape)


def param_spec(path, shape, mesh: Mesh, min_size: int | None = None) -> P:
    """The PartitionSpec of one parameter, derived from :data:`LOGICAL_AXIS_RULES`: at most
    one dimension split (the first in table order whose size its mesh axis divides);
    leaves under ``min_size`` elements (default :data:`MIN_SHARD_SIZE`) replicated."""
    min_size = MIN_SHARD_SIZE if min_size is None else min_size
    names = param_logical_axes(path, shape)
    spec = [None] * len(shape)
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return P(*spec)
    ranked = sorted((i for i, n in enumerate(names) if n is not None),
                    key=lambda i: _ORDER[names[i]])
    for i in ranked:
        axis = _RULES[names[i]]
        size = mesh.shape.get(axis, 1) if isinstance(axis, str) else 1
        if size > 1 and shape[i] % size == 0:
            spec[i] = axis
            break
    return P(*spec)


def param_placement(mesh: Mesh | None, min_size: int | None = None):
    """``(path, shape) -> NamedSharding`` for ``weights.load_params(placement=...)``;
    None without a mesh."""
    if mesh is None:
        return None

    def place(path, shape):
        return NamedSharding(mesh, param_spec(path, tuple(shape), mesh, min_size))
    return place


def flat_path(keypath) -> tuple:
    """A pytree key path as a tuple of plain keys / names / indices (what the rules read).
    An NNX variable's ``.value`` attribute is left out: the rules read the parameter's own
    name (``embedding``, ``pos_embed``, ``down`` ...), as in a checkpoint's keys."""
    out = []
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and \
            keypath[-1].name == "value":
        keypath = keypath[:-1]
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            out.append(str(k))
    return tuple(out)

def abstract_params(params, mesh: Mesh | None = None, min_size: int | None = None):
    """``params`` (any pytree of arrays or shapes) as ``jax.ShapeDtypeStruct`` leaves,
    placed on ``mesh`` by the rules (no sharding without a mesh): what a program lowered
    for a mesh without weights takes (``analysis.tpu``)."""
    place = param_placement(mesh, min_size)

    def leaf(keypath, a):
        shape = tuple(np.shape(a))
        return jax.ShapeDtypeStruct(shape, a.dtype, sharding=None if place is None else
                                    place(flat_path(keypath), shape))
    return jax.tree_util.tree_map_with_path(leaf, params)


def abstract_array(shape, dtype, mesh: Mesh, names) -> jax.ShapeDtypeStruct:
    """An abstract argument ``shape`` / ``dtype`` split over ``mesh`` by the logical axis
    ``names`` (``("batch", None, "rows", None)`` ...): what a program lowered for a mesh
    takes in place of an input."""
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=NamedSharding(mesh, logical_spec(names, mesh)))


def shard_params(params, mesh: Mesh, min_size: int | None = None):
    """``params`` (any pytree of arrays, e.g. a model's NNX state) placed on ``mesh`` by
    the rules: for weights already in memory (random weights, the demo model)."""
    place = param_placement(mesh, min_size)

    def put(keypath, leaf):
        return jax.device_put(leaf, place(flat_path(keypath), np.shape(leaf)))
    return jax.tree_util.tree_map_with_path(put, params)


# ----------------------------------------------------------------------------- batches

def batch_shards(mesh: Mesh) -> int:
    return int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))


def padded_batch(batch: int, mesh: Mesh) -> int:
    """The batch a mesh runs: ``batch`` rounded up to a multiple of ``data * fsdp``. The
    extra rows are copies of the last image's inputs and are dropped from the output."""
    n = batch_shards(mesh)
    return -(-batch // n) * n


def pad_rows(x: np.ndarray, rows: int, groups: int = 1) -> np.ndarray:
    """``x`` (``groups`` blocks of equal rows along axis 0) with each block padded to
    ``rows`` by repeating its last row."""
    if groups * rows == x.shape[0]:
        return x
    blocks = np.split(x, groups, axis=0)
    return np.concatenate([np.concatenate([b, np.repeat(b[-1:], rows - b.shape[0], 0)], 0)
                           for b in blocks], 0)


def to_global(x, sharding: NamedSharding):
    """A host value (or a local / fully replicated array) as a global array with
    ``sharding``: every device's shard is built from the host copy, which works with one
    process and with several (each builds only its own devices' shards)."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_batch(x, mesh: Mesh):
    """A host batch (rows first) as a global array split over the mesh's ``data`` and
    ``fsdp`` axes (the "batch" rule); ValueError when its rows do not divide over them."""
    n = batch_shards(mesh)
    rows = int(np.shape(x)[0])
    if rows % n:
        raise ValueError(f"a batch of {rows} does not divide over the mesh's data x fsdp = "
                         f"{n} devices: use a multiple of {n}")
    return to_global(x, NamedSharding(mesh, logical_spec(("batch",), mesh)))


def to_host(x) -> np.ndarray:
    """A (possibly multi-host) array gathered to a NumPy array on every process."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def latent_spec(mesh: Mesh, ndim: int = 4, row_axis: int = 2) -> P:
    names = [None] * ndim
    names[0] = "batch"
    if row_axis is not None:
        names[row_axis] = "rows"
    return logical_spec(names, mesh)


def activation_constraint(mesh: Mesh | None):
    """``x -> x`` with NHWC activations constrained to (batch, rows) sharding, or None
    when there is no mesh."""
    if mesh is None:
        return None
    sharding = NamedSharding(mesh, latent_spec(mesh, 4, 1))

    def constrain(x):
        return jax.lax.with_sharding_constraint(x, sharding)
    return constrain


def token_constraint(mesh: Mesh | None):
    """``x -> x`` with ``[batch, tokens, channels]`` activations constrained to the batch
    split over ``data`` x ``fsdp`` (a transformer's residual streams between blocks), or
    None without a mesh. It keeps XLA on the FSDP pattern (weights gathered, activations
    split by rows) instead of splitting activations along a split kernel's features."""
    if mesh is None:
        return None
    sharding = NamedSharding(mesh, logical_spec(("batch", None, None), mesh))

    def constrain(x):
        return jax.lax.with_sharding_constraint(x, sharding)
    return constrain


# ----------------------------------------------------------------------------- spatial

def check_split(mesh: Mesh, unet_config, latent_hw, merge=None, batch=None,
                guidance=True) -> None:
    """A clear error when ``spatial`` does not divide the latent rows at every UNet level,
    when a merge window / cell would straddle a shard boundary, or when padding the batch
    would change what it computes (tomesd switches ToMe's randomness off for an odd UNet
    batch: without guidance, padding an odd batch to an even one would switch it on)."""
    if batch is not None and merge is not None:
        merge.check_padding(batch, padded_batch(batch, mesh), guidance)
    s = int(mesh.shape.get("spatial", 1))
    if s == 1:
        return
    h = int(latent_hw[0])
    levels = unet_config.num_upsamplers + 1
    need = s * 2 ** (levels - 1)
    if h % need:
        raise ValueError(
            f"spatial={s} does not divide the latent rows at every UNet level: {h} latent "
            f"rows over {levels} levels (down to {h / 2 ** (levels - 1):g} rows) need a "
            f"multiple of {need} (image height a multiple of {need} x the VAE factor)")
    for d in unet_config.attention_downsamples():
        rows = h // d // s
        units = merge.windows(d) if merge is not None and merge.applies(d) else []
        for cell in dict.fromkeys(window[0] for _, window in units):
            if rows % cell:
                raise ValueError(
                    f"{type(merge).__name__}: windows {cell} rows high straddle the spatial "
                    f"shards at downsample {d} ({h // d} rows / spatial={s} = {rows} rows "
                    f"per device): use a window height dividing {rows} or a smaller spatial")


# ----------------------------------------------------------------------------- pipelines

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all",
               "reduce-scatter")


def count_collectives(hlo_text: str) -> dict:
    """How many of each collective a compiled program's HLO text holds
    (``compiled.as_text()``; an async ``-start``/``-done`` pair counts once)."""
    import re

    counts = dict.fromkeys(COLLECTIVES, 0)
    pattern = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        m = pattern.search(line)
        if m:
            counts[m.group(1)] += 1
    return counts


# ----------------------------------------------------------------------------- hosts

def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids=None, **kwargs) -> tuple[int, int]:
    """Join a multi-host JAX run (wraps ``jax.distributed.initialize``); returns
    ``(process_index, process_count)``.

    On TPU pods and Slurm / Open MPI clusters call it with no arguments: JAX finds the
    coordinator, the process count and this process's id. Elsewhere pass them, or set
    ``RETOM_COORDINATOR`` (``host:port``), ``RETOM_NUM_PROCESSES`` and ``RETOM_PROCESS_ID``.
    Call it once, first, on every process, before any other JAX call.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("RETOM_COORDINATOR")
    if num_processes is None and env.get("RETOM_NUM_PROCESSES"):
        num_processes = int(env["RETOM_NUM_PROCESSES"])
    if process_id is None and env.get("RETOM_PROCESS_ID"):
        process_id = int(env["RETOM_PROCESS_ID"])
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError("initialize_distributed: give coordinator_address, num_processes and "
                         "process_id together (or none of them on TPU / Slurm / MPI)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids, **kwargs)
    return jax.process_index(), jax.process_count()
