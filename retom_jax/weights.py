"""Reading diffusers/transformers checkpoint folders into Flax NNX modules, without torch.

A checkpoint folder holds ``config.json`` and safetensors weights named
``{stem}.safetensors`` (``stem`` is ``diffusion_pytorch_model`` for diffusers, ``model``
for transformers), optionally as a ``.fp16`` variant or sharded behind
``{stem}.safetensors.index.json``.

Our modules name their submodules exactly as the PyTorch models do, so a parameter path
such as ``('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')`` maps to the PyTorch key
``down_blocks.0.resnets.1.conv1.weight`` through the short table ``RENAME`` below and a
transpose of matrix and convolution kernels. Any missing, unexpected or wrongly shaped key
is an error that names it.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

# Flax parameter name -> PyTorch parameter name.
RENAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint folder or weight file is missing, corrupt or does not fit the model."""


# ----------------------------------------------------------------------------- files

def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as NumPy arrays (memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is not a safetensors file: only {size} bytes")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is corrupt or truncated: its header claims {header_len} bytes "
                f"but the file has {size}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({e})") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + header_len else b""
    data_start = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupt: bad header entry for {name!r}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != nbytes or data_start + end > size:
            raise CheckpointError(
                f"{path} is corrupt or truncated: tensor {name!r} {info['dtype']}{list(shape)} "
                f"does not fit its byte range"
            )
        out[name] = np.frombuffer(buf, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize,
                                  offset=data_start + begin).reshape(shape)
    return out


def read_safetensors_metadata(path) -> dict[str, str]:
    """The ``__metadata__`` strings of a ``.safetensors`` file's header ({} if none)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: only {len(head)} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > path.stat().st_size - 8:
            raise CheckpointError(f"{path} is corrupt or truncated: its header claims "
                                  f"{header_len} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def weight_files(folder, stem: str, variant: str | None = None) -> list[Path]:
    """The safetensors files of one model folder (several when sharded)."""
    folder = Path(folder)
    names = [f"{stem}.{variant}" if variant else stem] + ([] if variant else [f"{stem}.fp16"])
    for name in names:
        single = folder / f"{name}.safetensors"
        index = folder / f"{name}.safetensors.index.json"
        if single.is_file():
            return [single]
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e})") from None
            return [folder / shard for shard in sorted(set(weight_map.values()))]
    pickles = sorted(p.name for p in folder.glob(f"{stem}*.bin"))
    hint = (f" It has PyTorch pickles ({', '.join(pickles)}), which are not read without torch: "
            "re-save the model with safe_serialization=True." if pickles else "")
    wanted = " or ".join(f"{n}.safetensors[.index.json]" for n in names)
    raise CheckpointError(f"no weights in {folder}: expected {wanted}.{hint}")


def read_state_dict(folder, stem: str, variant: str | None = None) -> dict[str, np.ndarray]:
    state = {}
    for file in weight_files(folder, stem, variant):
        state.update(read_safetensors(file))
    return state


def read_json(folder, name: str) -> dict:
    """The JSON object in ``folder/name``, or a CheckpointError saying what is wrong."""
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {name}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return value


def read_config(folder) -> dict:
    return read_json(folder, "config.json")


def cached_snapshot(repo_id: str, what: str = "local folder") -> Path:
    """The local Hugging Face cache's snapshot of ``repo_id``; never touches the network."""
    repo_id = str(repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise CheckpointError(f"{repo_id!r} is neither a {what} nor a Hugging Face repo id")
    from huggingface_hub import constants, snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except Exception:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and is not in the local Hugging Face cache "
            f"({cache}). retom-jax never downloads weights: fetch them where there is "
            f"network (`hf download {repo_id}`), then pass the folder or copy the cache here."
        ) from None


def resolve_folder(path_or_repo_id, subfolder: str | None = None) -> Path:
    """A local model folder: ``path`` itself, ``path/subfolder`` for a pipeline folder, or
    a Hugging Face repo id found in the local cache. Never touches the network."""
    path = Path(os.path.expanduser(str(path_or_repo_id)))
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        if subfolder and (path / subfolder / "config.json").is_file():
            return path / subfolder
        where = f" nor in its {subfolder}/ subfolder" if subfolder else ""
        raise CheckpointError(f"{path} has no config.json{where}: not a model folder")
    return resolve_folder(cached_snapshot(path_or_repo_id), subfolder)


# ----------------------------------------------------------------------------- mapping

def torch_key(path: tuple) -> str:
    *prefix, leaf = (str(p) for p in path)
    return ".".join([*prefix, RENAME.get(leaf, leaf)])


def to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:  # Linear: (out, in) -> (in, out)
        return array.T
    if leaf == "kernel" and array.ndim == 4:  # Conv: OIHW -> HWIO
        return array.transpose(2, 3, 1, 0)
    return array


class KeySource:
    """Stands in for ``nnx.Rngs`` while a module is built: every stream (``params()``,
    ``dropout()`` ...) hands out ``fold_in(key, i)`` for a Python counter ``i``.

    ``nnx.Rngs`` keeps its counters in NNX variables; under tracing each counter update
    makes JAX rescan the whole trace, so building SDXL abstractly took about a minute.
    """

    def __init__(self, key):
        self.key, self.count = key, 0

    def __call__(self):
        self.count += 1
        return jax.random.fold_in(self.key, self.count)

    def __getattr__(self, stream):  # any stream name: rngs.params(), rngs.dropout() ...
        if stream.startswith("__"):
            raise AttributeError(stream)
        return self.__call__


def abstract_module(build: Callable[[KeySource], nnx.Module]) -> nnx.Module:
    """The module's structure with shapes only: no parameter is initialised."""
    key = jax.random.key(0)
    return nnx.eval_shape(lambda: build(KeySource(key)))


def random_state(abstract_state, dtype, seed: int = 0, pool_size: int = 1 << 22):
    """Random values for an abstract NNX state (shapes only), fast at any model size.

    Values are copied from one pool of ``pool_size`` standard normals at a random offset
    per parameter (SDXL's 2.6 billion values take seconds; initialising in JAX compiles a
    program per shape). Kernels and embeddings are scaled by ``1 / sqrt(fan_in)``, norm
    scales are ``1 + 0.1 * noise``, biases ``0.02 * noise``: activations stay in a sensible
    range and nothing is exactly zero. For benchmarks and demos, not for training.
    """
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(pool_size, dtype=np.float32)
    pure = {}
    for path, var in nnx.to_flat_state(abstract_state):
        leaf, shape = str(path[-1]), tuple(var.shape)
        size = int(np.prod(shape, dtype=np.int64))
        start = int(rng.integers(pool_size))
        reps = -(-(start + size) // pool_size)
        values = (np.tile(pool, reps) if reps > 1 else pool)[start:start + size].reshape(shape)
        if leaf == "scale":
            values = 1.0 + 0.1 * values
        elif leaf == "bias":
            values = 0.02 * values
        else:  # kernel (in, out) / (kh, kw, in, out), embedding (num, dim)
            fan_in = shape[-1] if leaf == "embedding" else int(np.prod(shape[:-1]))
            values = values / np.float32(np.sqrt(max(fan_in, 1)))
        pure[path] = jnp.asarray(values, dtype)
    return nnx.from_flat_state(pure)


def random_params(build: Callable[[KeySource], nnx.Module], dtype, seed: int = 0):
    """``(graphdef, params)`` of the module ``build(rngs)`` with `random_state` weights."""
    graphdef, abstract = nnx.split(abstract_module(build))
    return graphdef, random_state(abstract, dtype, seed)


def load_params(module: nnx.Module, state_dict: dict[str, np.ndarray], param_dtype,
                where: str = "checkpoint", key_map: Callable[[str], str] | None = None,
                placement: Callable | None = None):
    """Fill an abstract module with PyTorch-layout weights.

    Returns ``(graphdef, params)``: ``params`` is the module's state as a pytree of arrays
    in ``param_dtype``; ``nnx.merge(graphdef, params)`` rebuilds the module.
    ``placement(path, shape) -> Sharding`` (``sharding.param_placement(mesh)``) builds each
    array shard by shard from the (memory-mapped) weights: each device reads only its part.
    """
    graphdef, abstract = nnx.split(module)
    flat = nnx.to_flat_state(abstract)
    expected = {}
    for path, var in flat:
        key = torch_key(path)
        expected[key_map(key) if key_map else key] = (path, var)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}"
                        + (" ..." if len(unexpected) > 8 else ""))
    pure = {}
    for key, (path, var) in expected.items():
        if key not in state_dict:
            continue
        array = to_flax_layout(state_dict[key], str(path[-1]))
        want = tuple(var.shape)
        if array.shape != want:
            problems.append(f"{key} has shape {list(state_dict[key].shape)} in the weights, "
                            f"the config implies {list(to_torch_shape(want, str(path[-1])))}")
            continue
        if placement is not None:
            pure[path] = jax.make_array_from_callback(
                want, placement(path, want),
                lambda idx, a=array: np.asarray(a[idx]).astype(param_dtype))
        else:
            pure[path] = jnp.asarray(array).astype(param_dtype)
    if problems:
        raise CheckpointError(f"the weights in {where} do not fit the model built from its "
                              f"config.json: " + "; ".join(problems))
    return graphdef, nnx.from_flat_state(pure)


def to_torch_shape(shape: tuple, leaf: str) -> tuple:
    if leaf == "kernel" and len(shape) == 2:
        return shape[::-1]
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def parse_dtype(dtype) -> jnp.dtype:
    """``"bf16"``/``"bfloat16"``/``jnp.bfloat16`` ... -> a float dtype, or a clear error."""
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
               "float": "float32"}
    try:
        d = jnp.dtype(aliases.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    except TypeError:
        d = None
    allowed = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if d not in allowed:
        raise ValueError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")
    return d


def param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
